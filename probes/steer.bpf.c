// SPDX-License-Identifier: GPL-2.0
/* steer: an sk_lookup program that hands connections (TCP) and datagrams (UDP) for bound
 * (proto, address prefix, port) triples to one target socket per binding.
 *
 * `steer_ports` (LPM trie) maps (family, proto, port, local address) to a binding id; the
 * longest address prefix wins (user space resolves overlapping port ranges of one prefix when it
 * writes the trie: the narrowest range owns the port). `steer_targets[binding]` holds the target
 * socket. A binding whose socket has gone (the kernel removes closed sockets from a SOCKMAP) is
 * failed closed: SK_DROP, so the client is refused instead of reaching whatever else listens.
 * Unbound traffic gets SK_PASS and the kernel's normal lookup. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "skrelay.h"

#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, STEER_MAX_PORT_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct steer_key);
	__type(value, __u32); /* binding id */
} steer_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, STEER_MAX_BINDINGS);
	__type(key, __u32);   /* binding id */
	__type(value, __u64); /* fd on update, socket cookie on lookup from user space */
} steer_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STEER_MAX_BINDINGS);
	__type(key, __u32);
	__type(value, struct steer_binding);
} steer_bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_MAX_BINDINGS);
	__type(key, __u32);
	__type(value, struct steer_counters);
} steer_stats SEC(".maps");

/* [0]: version of the program behind the pinned link (see relay/steer/state.rs). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} steer_info SEC(".maps");

SEC("sk_lookup")
int steer_lookup(struct bpf_sk_lookup *ctx)
{
	struct steer_key key = {};
	key.family = ctx->family;
	key.proto = ctx->protocol;
	key.port = ctx->local_port;
	if (ctx->family == AF_INET) {
		key.prefixlen = 32 + 32;
		key.addr[0] = ctx->local_ip4;
	} else if (ctx->family == AF_INET6) {
		key.prefixlen = 32 + 128;
		key.addr[0] = ctx->local_ip6[0];
		key.addr[1] = ctx->local_ip6[1];
		key.addr[2] = ctx->local_ip6[2];
		key.addr[3] = ctx->local_ip6[3];
	} else {
		return SK_PASS;
	}

	__u32 *binding = bpf_map_lookup_elem(&steer_ports, &key);
	if (!binding)
		return SK_PASS;
	__u32 id = *binding;
	/* An earlier sk_lookup program already chose a socket: the first choice stands. */
	if (ctx->sk)
		return SK_PASS;

	struct steer_counters *c = bpf_map_lookup_elem(&steer_stats, &id);
	struct bpf_sock *sk = bpf_map_lookup_elem(&steer_targets, &id);
	if (!sk) {
		if (c)
			c->refused++;
		return SK_DROP; /* fail closed: the target is gone */
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		if (c)
			c->refused++;
		return SK_DROP;
	}
	if (c)
		c->hits++;
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
