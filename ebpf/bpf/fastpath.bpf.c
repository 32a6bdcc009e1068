//! Hot path: per-packet tc classifiers (see docs/HOT_PATH.md).
// SPDX-License-Identifier: (BSD-3-Clause OR GPL-2.0)
/* Overlay fast path: tc ingress classifiers for job veths (host side), the VXLAN device and the
 * underlay device.
 *
 * - Destination is a job on this host (flynn_endpoints): rewrite L2 (gateway MAC -> job MAC) and
 *   hand the packet straight to the job's namespace with bpf_redirect_peer.
 * - Destination is in a remote block (flynn_prefixes, from a job only): when the block's peer is
 *   in flynn_tunnels and flynn_underlay is set, encapsulate in BPF (outer Ethernet, IPv4, UDP,
 *   VXLAN and inner Ethernet pushed with bpf_skb_adjust_room) and send it out of the underlay
 *   device with bpf_redirect_neigh (a FIB lookup on the outer destination fills L2). Otherwise
 *   send it to the VXLAN device with bpf_redirect_neigh, which fills L2 from the kernel's
 *   (permanent) neighbour entry.
 * - A VXLAN packet on the underlay for a job on this host (flynn_underlay describes what our
 *   VXLAN packets look like), sent by the peer that holds its inner source's block (its
 *   flynn_tunnels entry names the outer source): the outer IPv4/UDP/VXLAN and inner Ethernet
 *   headers are removed with bpf_skb_adjust_room and the inner packet goes straight to the job
 *   (bpf_redirect_peer), without the kernel's UDP socket, VXLAN receive and GRO cell.
 * - Anything else, or a miss: TC_ACT_UNSPEC, i.e. on to whatever else is attached (later TCX
 *   programs, then the device's tc filters) and the normal kernel path. Empty maps are safe.
 *   (TC_ACT_OK would end the chain there: other users' tc filters would stop running.)
 *
 * Routed packets (remote out, VXLAN in) get their TTL decremented like the kernel's forwarding
 * path would; a TTL that would expire goes to the kernel so it can answer with ICMP, and so does
 * a remote-bound packet too big for the hop's device (bpf_check_mtu), so the kernel fragments it
 * or answers with ICMP. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fastpath.h"

#ifndef AF_INET
#define AF_INET 2
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct flynn_endpoint);
} flynn_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flynn_prefix_key);
	__type(value, struct flynn_hop);
} flynn_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct flynn_tunnel);
} flynn_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flynn_underlay);
} flynn_underlay SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLYNN_CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} flynn_counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&flynn_counters, &idx);

	if (c)
		*c += 1;
}

static __always_inline int pass(void)
{
	count(FLYNN_CTR_PASSED);
	return TC_ACT_UNSPEC;
}

/* Finds the Ethernet and IPv4 headers; NULL when the packet is not plain IPv4. */
static __always_inline struct iphdr *ipv4(struct __sk_buff *skb, struct ethhdr **eth)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip;

	if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > end) {
		if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct iphdr)))
			return NULL;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > end)
			return NULL;
	}
	*eth = data;
	if ((*eth)->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	ip = data + sizeof(struct ethhdr);
	if (ip->version != 4 || ip->ihl < 5)
		return NULL;
	return ip;
}

/* ip_decrease_ttl() from the kernel: incremental checksum update for TTL - 1. */
static __always_inline void decrease_ttl(struct iphdr *ip)
{
	__u32 check = (__u32)ip->check;

	check += (__u32)bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

static __always_inline int to_local(struct __sk_buff *skb, struct ethhdr *eth,
				    const struct flynn_endpoint *ep)
{
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->gateway_mac, ETH_ALEN);
	count(FLYNN_CTR_LOCAL);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* ECN codepoints (the low two bits of the IPv4 TOS byte). */
#define ECN_MASK 3
#define ECN_NOT_ECT 0
#define ECN_ECT_1 1
#define ECN_ECT_0 2
#define ECN_CE 3

/* Sets the TOS byte, updating the header checksum incrementally (RFC 1624, eqn. 3) over the
 * 16-bit word that holds it. */
static __always_inline void set_tos(struct iphdr *ip, __u8 tos)
{
	__u16 *word = (__u16 *)ip;
	__u32 sum = (__u16)~ip->check;

	sum += (__u16)~*word;
	ip->tos = tos;
	sum += *word;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = (__u16)~sum;
}

/* RFC 6040 decapsulation, as the kernel's VXLAN receive does it (INET_ECN_decapsulate): the inner
 * TOS the job should see, or -1 when the packet must be dropped (a congestion mark on a packet
 * whose sender does not do ECN), which is left to the kernel (it drops and counts it). */
static __always_inline int ecn_decap(__u8 outer, __u8 inner)
{
	__u8 o = outer & ECN_MASK, i = inner & ECN_MASK;

	if (i == ECN_NOT_ECT)
		return o == ECN_CE ? -1 : inner;
	if (o == ECN_CE)
		return inner | ECN_CE;
	if (o == ECN_ECT_1 && i == ECN_ECT_0)
		return (inner & ~ECN_MASK) | ECN_ECT_1;
	return inner;
}

/* RFC 7348 header: flags (only I, "VNI valid", for plain VXLAN), then the VNI in the top 24 bits. */
struct vxlanhdr {
	__be32 flags;
	__be32 vni;
};

#define VXLAN_FLAG_VNI 0x08000000
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* What one VXLAN packet of ours carries before the inner IPv4 header, and what decapsulation
 * removes from after the outer Ethernet header (the outer Ethernet header is reused for the
 * inner packet, so the L2 rewrite stays what flynn_from_vxlan does). */
#define OUTER_LEN                                                                                  \
	(sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) +                    \
	 sizeof(struct vxlanhdr))
#define DECAP_LEN                                                                                  \
	(sizeof(struct iphdr) + sizeof(struct udphdr) + sizeof(struct vxlanhdr) +                  \
	 sizeof(struct ethhdr))
/* Outer headers, inner Ethernet and IPv4, and the first 8 bytes of the inner L4 header. */
#define HEADERS_LEN (OUTER_LEN + sizeof(struct ethhdr) + sizeof(struct iphdr) + 8)

#define ENCAP_FLAGS                                                                                \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |  \
	 BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr)))

/* The kernel's default local port range, which the VXLAN device draws its source ports from. */
#define SPORT_MIN 32768
#define SPORT_MAX 61000

/* Wraps the (inner) packet in outer IPv4 + UDP + VXLAN + inner Ethernet, as the kernel's VXLAN
 * device would: outer TTL 64, DF clear, no outer UDP checksum, source port from the flow hash
 * (udp_flow_src_port), outer DSCP 0 and the inner ECN field copied out (a CE mark as ECT(0):
 * RFC 6040 normal mode, INET_ECN_encapsulate) so routers on the underlay can mark congestion. bpf_skb_adjust_room marks the skb as UDP-tunnelled (inner headers, GSO
 * type), so GSO packets are segmented (or offloaded) correctly downstream; gso_size stays (the
 * inner MSS already fits the overlay MTU). Returns 0 when the packet is now encapsulated, -1
 * when it is unchanged (then the caller takes the VXLAN device). */
static __always_inline int encap(struct __sk_buff *skb, const struct flynn_underlay *ul,
				 const struct flynn_tunnel *tun, __u8 inner_tos)
{
	struct iphdr outer = {};
	struct udphdr *udp;
	struct vxlanhdr *vx;
	struct ethhdr *inner_eth;
	void *data, *end;
	__u32 hash, len;
	__s64 sum;

	/* The outer length must fit the 16-bit fields (GSO packets can be up to 64 KiB inner). */
	if (skb->len + DECAP_LEN - sizeof(struct ethhdr) > 0xFFFF)
		return -1;
	hash = bpf_get_hash_recalc(skb);
	if (bpf_skb_adjust_room(skb, DECAP_LEN, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS))
		return -1;
	len = skb->len;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + OUTER_LEN + sizeof(struct ethhdr) > end)
		return -2; /* cannot happen: adjust_room leaves the new headers linear */

	outer.version = 4;
	outer.ihl = 5;
	outer.tos = (inner_tos & ECN_MASK) == ECN_CE ? ECN_ECT_0 : inner_tos & ECN_MASK;
	outer.tot_len = bpf_htons(len - sizeof(struct ethhdr));
	outer.id = (__u16)bpf_get_prandom_u32();
	outer.ttl = 64;
	outer.protocol = IPPROTO_UDP;
	outer.saddr = ul->local_ip;
	outer.daddr = tun->remote_ip;
	sum = bpf_csum_diff(0, 0, (__be32 *)&outer, sizeof(outer), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	outer.check = (__u16)~sum;
	__builtin_memcpy(data + sizeof(struct ethhdr), &outer, sizeof(outer));

	udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	udp->source = bpf_htons(SPORT_MIN + (((__u64)hash * (SPORT_MAX - SPORT_MIN)) >> 32));
	udp->dest = bpf_htons(ul->port);
	udp->len = bpf_htons(len - sizeof(struct ethhdr) - sizeof(struct iphdr));
	udp->check = 0;

	vx = (void *)udp + sizeof(struct udphdr);
	vx->flags = bpf_htonl(VXLAN_FLAG_VNI);
	vx->vni = bpf_htonl(ul->vni << 8);

	inner_eth = (void *)vx + sizeof(struct vxlanhdr);
	__builtin_memcpy(inner_eth->h_dest, tun->vtep_mac, ETH_ALEN);
	__builtin_memcpy(inner_eth->h_source, ul->vtep_mac, ETH_ALEN);
	inner_eth->h_proto = bpf_htons(ETH_P_IP);
	return 0;
}

SEC("classifier")
int flynn_from_job(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct iphdr *ip = ipv4(skb, &eth);
	struct flynn_endpoint *ep;
	struct flynn_prefix_key key;
	struct flynn_hop *hop;
	struct bpf_redir_neigh nh = {};
	struct flynn_underlay *ul;
	struct flynn_tunnel *tun;
	__u32 daddr, ifindex, mtu_len, zero = 0;
	__u8 tos;

	if (!ip)
		return pass();
	daddr = ip->daddr;
	tos = ip->tos;

	ep = bpf_map_lookup_elem(&flynn_endpoints, &daddr);
	if (ep) {
		/* Hairpin to the sender's own veth: leave it to the kernel. */
		if (ep->ifindex == skb->ifindex)
			return pass();
		return to_local(skb, eth, ep);
	}

	key.prefixlen = 32;
	key.addr = daddr;
	hop = bpf_map_lookup_elem(&flynn_prefixes, &key);
	if (!hop || ip->ttl <= 1)
		return pass();
	/* The job's veth runs at the local MTU and only its route carries the overlay MTU, which
	 * sockets that ignore the path MTU (IP_PMTUDISC_PROBE/INTERFACE/OMIT, raw, packet) do not
	 * follow. A packet (or, for GSO, a segment) too big for the hop's device goes to the kernel,
	 * which fragments it or answers with ICMP; the tunnel would only drop it. */
	mtu_len = 0;
	if (bpf_check_mtu(skb, hop->ifindex, &mtu_len, 0, BPF_MTU_CHK_SEGS))
		return pass();
	ifindex = hop->ifindex;
	nh.nh_family = AF_INET;
	nh.ipv4_nh = hop->next_hop;
	decrease_ttl(ip);
	count(FLYNN_CTR_REMOTE);
	ul = bpf_map_lookup_elem(&flynn_underlay, &zero);
	tun = bpf_map_lookup_elem(&flynn_tunnels, &nh.ipv4_nh);
	if (ul && ul->port && ul->ifindex && tun) {
		int r = encap(skb, ul, tun, tos);

		if (r == 0) {
			count(FLYNN_CTR_ENCAP);
			return bpf_redirect_neigh(ul->ifindex, 0, 0, 0);
		}
		if (r < -1)
			return TC_ACT_SHOT;
	}
	return bpf_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

SEC("classifier")
int flynn_from_vxlan(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct iphdr *ip = ipv4(skb, &eth);
	struct flynn_endpoint *ep;
	__u32 daddr;

	if (!ip)
		return pass();
	daddr = ip->daddr;
	ep = bpf_map_lookup_elem(&flynn_endpoints, &daddr);
	if (!ep || ip->ttl <= 1)
		return pass();
	decrease_ttl(ip);
	return to_local(skb, eth, ep);
}

/* Whether the outer IPv4 and UDP headers are a VXLAN packet to us that the kernel would hand to
 * its VXLAN socket unchanged: no IP options or fragments, lengths consistent with the packet, our
 * address and port. */
static __always_inline int vxlan_to_us(const struct __sk_buff *skb, const struct iphdr *ip,
				       const struct udphdr *udp, const struct flynn_underlay *ul)
{
	return ip->version == 4 && ip->ihl == 5 && ip->protocol == IPPROTO_UDP &&
	       ip->daddr == ul->local_ip && !(ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) &&
	       bpf_ntohs(ip->tot_len) + sizeof(struct ethhdr) == skb->len &&
	       udp->dest == bpf_htons(ul->port) &&
	       bpf_ntohs(udp->len) + sizeof(struct iphdr) == bpf_ntohs(ip->tot_len);
}

/* The outer UDP checksum is not verified here (the kernel verifies it before its VXLAN receive).
 * What it covers is checked otherwise: the VXLAN header and inner Ethernet header must hold the
 * expected values, the inner IPv4 header has its own checksum (verified by the job's stack), and
 * so do TCP, ICMP and UDP with a checksum, which bpf_skb_adjust_room leaves for the job's stack
 * to verify (it resets CHECKSUM_UNNECESSARY). So with an outer checksum, only those are taken;
 * anything else (other protocols, inner fragments, UDP without checksum) goes to the kernel.
 * Without an outer checksum the kernel verifies nothing either. */
static __always_inline int inner_protected(const struct udphdr *outer, const struct iphdr *inner,
					   const struct udphdr *l4)
{
	if (!outer->check)
		return 1;
	if (inner->ihl != 5 || (inner->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return 0;
	return inner->protocol == IPPROTO_TCP || inner->protocol == IPPROTO_ICMP ||
	       (inner->protocol == IPPROTO_UDP && l4->check != 0);
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/* Whether a GSO packet (a TSO burst that crossed a veth, or a GRO packet of the underlay device)
 * may be decapsulated here. Only inner TCP (bpf_skb_adjust_room shrinks TCP GSO packets, and
 * the TCP receive path takes a GSO packet as it is) and only with a checksum state the job's
 * stack accepts for a merged packet: CHECKSUM_PARTIAL (a local sender, or GRO, which leaves its
 * packets so) stays trusted through the shrink. CHECKSUM_UNNECESSARY (hardware LRO) would be
 * reset by adjust_room, and the job would then verify one header checksum against the whole
 * merged payload: those go to the kernel. The skb keeps its tunnel GSO type and encapsulation
 * bit (6.18 has no adjust_room flag to clear them); its inner header offsets then describe the
 * decapsulated packet itself (the outer Ethernet header moves onto the inner one), so a job
 * that forwards it still segments it correctly. */
static __always_inline int gso_decap_ok(struct __sk_buff *skb, const struct iphdr *inner)
{
	return inner->protocol == IPPROTO_TCP && inner->ihl == 5 &&
	       !(inner->frag_off & bpf_htons(IP_MF | IP_OFFSET)) &&
	       bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY) < 0;
}

/* Whether the outer source is the underlay address of the peer that holds the inner source's
 * block (flynn_prefixes, then that hop's flynn_tunnels entry). tc ingress and bpf_redirect_peer
 * skip netfilter: without this, anyone on the underlay could send frames with a cluster job's
 * inner source straight into local jobs, past a firewall that lets VXLAN in only from the
 * cluster's hosts. Anything else goes to the kernel, where that firewall applies. Peers without
 * a tunnel entry (reached by another device, or past a full map) are decapsulated by the kernel
 * too. */
static __always_inline int from_peer(const struct iphdr *outer, const struct iphdr *inner)
{
	struct flynn_prefix_key key;
	struct flynn_tunnel *tun;
	struct flynn_hop *hop;
	__u32 next_hop;

	key.prefixlen = 32;
	key.addr = inner->saddr;
	hop = bpf_map_lookup_elem(&flynn_prefixes, &key);
	if (!hop)
		return 0;
	next_hop = hop->next_hop;
	tun = bpf_map_lookup_elem(&flynn_tunnels, &next_hop);
	return tun && tun->remote_ip == outer->saddr;
}

SEC("classifier")
int flynn_from_underlay(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct flynn_underlay *ul;
	struct flynn_endpoint *ep;
	struct ethhdr *eth, *inner_eth;
	struct iphdr *ip, *inner;
	struct udphdr *udp;
	struct vxlanhdr *vx;
	void *data, *end;
	__u32 daddr;
	int tos;

	/* Everything arriving on the host's underlay passes here: leave non-candidates quickly and
	 * without counting them. */
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->len < HEADERS_LEN)
		return TC_ACT_UNSPEC;
	ul = bpf_map_lookup_elem(&flynn_underlay, &zero);
	if (!ul || !ul->port)
		return TC_ACT_UNSPEC;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + HEADERS_LEN > end) {
		/* Headers not in the linear area: look before pulling, so only our VXLAN packets
		 * are ever linearised. */
		struct iphdr oip;
		struct udphdr oudp;

		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &oip, sizeof(oip)) ||
		    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(oip), &oudp,
				       sizeof(oudp)))
			return TC_ACT_UNSPEC;
		if (!vxlan_to_us(skb, &oip, &oudp, ul))
			return TC_ACT_UNSPEC;
		if (bpf_skb_pull_data(skb, HEADERS_LEN))
			return pass();
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + HEADERS_LEN > end)
			return pass();
	}
	eth = data;
	ip = data + sizeof(struct ethhdr);
	udp = (void *)ip + sizeof(struct iphdr);
	if (eth->h_proto != bpf_htons(ETH_P_IP) || !vxlan_to_us(skb, ip, udp, ul))
		return TC_ACT_UNSPEC;

	/* From here on it is VXLAN for us: what is not delivered here is counted as passed. */
	vx = (void *)udp + sizeof(struct udphdr);
	inner_eth = (void *)vx + sizeof(struct vxlanhdr);
	inner = (void *)inner_eth + sizeof(struct ethhdr);
	if (vx->flags != bpf_htonl(VXLAN_FLAG_VNI) || vx->vni != bpf_htonl(ul->vni << 8))
		return pass();
	if (inner_eth->h_proto != bpf_htons(ETH_P_IP) ||
	    !mac_eq(inner_eth->h_dest, ul->vtep_mac))
		return pass();
	if (inner->version != 4 || inner->ihl < 5 || inner->ttl <= 1 ||
	    !inner_protected(udp, inner, (void *)inner + sizeof(struct iphdr)))
		return pass();
	daddr = inner->daddr;
	ep = bpf_map_lookup_elem(&flynn_endpoints, &daddr);
	if (!ep || !from_peer(ip, inner))
		return pass();
	if (skb->gso_size && !gso_decap_ok(skb, inner))
		return pass();
	tos = ecn_decap(ip->tos, inner->tos);
	if (tos < 0)
		return pass();
	/* Pops outer IPv4 + UDP + VXLAN + inner Ethernet after the outer Ethernet header. Inner
	 * checksums are untouched (end to end); CHECKSUM_UNNECESSARY (which covered the outer
	 * headers only) is reset so the job's stack verifies them. */
	if (bpf_skb_adjust_room(skb, -(__s32)DECAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return pass();
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > end)
		return TC_ACT_SHOT; /* cannot happen: adjust_room keeps the headers linear */
	eth = data;
	inner = data + sizeof(struct ethhdr);
	/* The kernel path routes the inner packet once (VXLAN device -> bridge). */
	decrease_ttl(inner);
	if (tos != inner->tos)
		set_tos(inner, tos);
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->gateway_mac, ETH_ALEN);
	count(FLYNN_CTR_DECAP);
	if (skb->gso_size)
		count(FLYNN_CTR_DECAP_GSO);
	return bpf_redirect_peer(ep->ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
