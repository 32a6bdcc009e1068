/* SPDX-License-Identifier: BSD-3-Clause */
/* Map layouts shared by fastpath.bpf.c and the Rust loader (src/maps.rs). The Rust side's
 * #[repr(C)] structs are checked against these by a test (build.rs measures them with clang). */
#ifndef FLYNN_FASTPATH_H
#define FLYNN_FASTPATH_H

#include <linux/types.h>

/* Value of flynn_endpoints, keyed by the job's IPv4 address (network byte order). */
struct flynn_endpoint {
	__u32 ifindex;        /* host-side veth of the job */
	__u8 mac[6];          /* the job's MAC (destination after rewrite) */
	__u8 gateway_mac[6];  /* the bridge's MAC (source after rewrite) */
};

/* Key of flynn_prefixes (LPM trie): prefix length in bits, then the address (network order). */
struct flynn_prefix_key {
	__u32 prefixlen;
	__u32 addr;
};

/* Value of flynn_prefixes: where a remote block goes. */
struct flynn_hop {
	__u32 ifindex;   /* the VXLAN device */
	__u32 next_hop;  /* IPv4 next hop (network order), resolved by the kernel neighbour table */
};

/* The one entry of flynn_underlay (array of 1): this host's VXLAN settings, for decapsulation on
 * the underlay device and encapsulation towards flynn_tunnels. port == 0: neither happens. */
struct flynn_underlay {
	__u32 local_ip;     /* this host's underlay address (network order): outer dst in, src out */
	__u32 vni;          /* VXLAN network identifier (host order, 24 bits) */
	__u16 port;         /* VXLAN UDP destination port (host order) */
	__u8 vtep_mac[6];   /* the VXLAN device's MAC: inner Ethernet destination in, source out */
	__u32 ifindex;      /* the underlay device encapsulated packets leave by; 0: no encap */
};

/* Value of flynn_tunnels, keyed by a flynn_hop's next_hop (a remote block's network address):
 * where that block's VXLAN packets go, for encapsulation in BPF. */
struct flynn_tunnel {
	__u32 remote_ip;    /* the peer's underlay address (network order) */
	__u8 vtep_mac[6];   /* the peer's VXLAN device MAC: inner Ethernet destination */
	__u16 pad;
};

/* Indexes of flynn_counters (per-CPU array of __u64). */
enum flynn_counter {
	FLYNN_CTR_LOCAL = 0,   /* redirected to a local job (bpf_redirect_peer) */
	FLYNN_CTR_REMOTE = 1,  /* redirected to a remote block (bpf_redirect_neigh) */
	FLYNN_CTR_PASSED = 2,  /* left to the kernel path */
	FLYNN_CTR_DECAP = 3,   /* VXLAN decapsulated on the underlay and delivered to a local job */
	FLYNN_CTR_ENCAP = 4,   /* VXLAN encapsulated in BPF and sent out of the underlay device */
	FLYNN_CTR_DECAP_GSO = 5, /* of FLYNN_CTR_DECAP: GSO packets (TSO bursts, GRO packets) */
	FLYNN_CTR_MAX = 6,
};

#endif
