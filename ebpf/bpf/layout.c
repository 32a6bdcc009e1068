/* Host program run by build.rs: prints the layout of fastpath.h's structs as Rust constants so
 * a test can compare them with the loader's #[repr(C)] types. */
#include <stddef.h>
#include <stdio.h>

#include "fastpath.h"

#define FIELD(s, f) printf("pub const %s_%s: usize = %zu;\n", #s, #f, offsetof(struct s, f))
#define SIZE(s) printf("pub const %s_SIZE: usize = %zu;\n", #s, sizeof(struct s))

int main(void)
{
	SIZE(flynn_endpoint);
	FIELD(flynn_endpoint, ifindex);
	FIELD(flynn_endpoint, mac);
	FIELD(flynn_endpoint, gateway_mac);
	SIZE(flynn_prefix_key);
	FIELD(flynn_prefix_key, prefixlen);
	FIELD(flynn_prefix_key, addr);
	SIZE(flynn_hop);
	FIELD(flynn_hop, ifindex);
	FIELD(flynn_hop, next_hop);
	printf("pub const FLYNN_CTR_LOCAL: u32 = %d;\n", FLYNN_CTR_LOCAL);
	printf("pub const FLYNN_CTR_REMOTE: u32 = %d;\n", FLYNN_CTR_REMOTE);
	SIZE(flynn_underlay);
	FIELD(flynn_underlay, local_ip);
	FIELD(flynn_underlay, vni);
	FIELD(flynn_underlay, port);
	FIELD(flynn_underlay, vtep_mac);
	FIELD(flynn_underlay, ifindex);
	SIZE(flynn_tunnel);
	FIELD(flynn_tunnel, remote_ip);
	FIELD(flynn_tunnel, vtep_mac);
	printf("pub const FLYNN_CTR_ENCAP: u32 = %d;\n", FLYNN_CTR_ENCAP);
	printf("pub const FLYNN_CTR_DECAP: u32 = %d;\n", FLYNN_CTR_DECAP);
	printf("pub const FLYNN_CTR_DECAP_GSO: u32 = %d;\n", FLYNN_CTR_DECAP_GSO);
	printf("pub const FLYNN_CTR_PASSED: u32 = %d;\n", FLYNN_CTR_PASSED);
	printf("pub const FLYNN_CTR_MAX: u32 = %d;\n", FLYNN_CTR_MAX);
	return 0;
}
