//! Hot path: per-packet tc classifiers (see docs/HOT_PATH.md).
// SPDX-License-Identifier: (BSD-3-Clause OR GPL-2.0)
/* Overlay fast path: tc ingress classifiers for job veths (host side) and the VXLAN device.
 *
 * - Destination is a job on this host (flynn_endpoints): rewrite L2 (gateway MAC -> job MAC) and
 *   hand the packet straight to the job's namespace with bpf_redirect_peer.
 * - Destination is in a remote block (flynn_prefixes, from a job only): send it to the VXLAN
 *   device with bpf_redirect_neigh, which fills L2 from the kernel's (permanent) neighbour entry.
 * - Anything else, or a miss: TC_ACT_OK, i.e. the normal kernel path. Empty maps are safe.
 *
 * Routed packets (remote out, VXLAN in) get their TTL decremented like the kernel's forwarding
 * path would; a TTL that would expire goes to the kernel so it can answer with ICMP. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
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
	return TC_ACT_OK;
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

SEC("classifier")
int flynn_from_job(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct iphdr *ip = ipv4(skb, &eth);
	struct flynn_endpoint *ep;
	struct flynn_prefix_key key;
	struct flynn_hop *hop;
	struct bpf_redir_neigh nh = {};
	__u32 daddr, ifindex;

	if (!ip)
		return pass();
	daddr = ip->daddr;

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
	ifindex = hop->ifindex;
	nh.nh_family = AF_INET;
	nh.ipv4_nh = hop->next_hop;
	decrease_ttl(ip);
	count(FLYNN_CTR_REMOTE);
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

char _license[] SEC("license") = "Dual BSD/GPL";
