// SPDX-License-Identifier: GPL-2.0
/* relay: splice the two sockets of a pair inside the kernel.
 *
 * `socks` carries the stream parser + verdict: every skb that arrives on a member socket is
 * redirected to the egress of its peer. The peer is looked up by socket cookie in `peers`, and
 * the redirect goes through `targets`, a SOCKHASH without programs. User space fills `targets`
 * and `peers` for both sockets of a pair BEFORE either joins `socks`, so a verdict never runs
 * while its peer is unreachable (bpf_sk_redirect_hash drops the skb in that case). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "skrelay.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);   /* socket cookie */
	__type(value, __u32); /* socket fd on update */
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);   /* cookie */
	__type(value, __u64); /* the peer's cookie */
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RELAY_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} relay_stats SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&relay_stats, &idx);
	if (v)
		*v += n; /* per-CPU slot: no atomics needed */
}

SEC("sk_skb/stream_parser")
int relay_parser(struct __sk_buff *skb)
{
	return skb->len; /* no framing: each skb is one message */
}

SEC("sk_skb/stream_verdict")
int relay_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 *peer = bpf_map_lookup_elem(&peers, &cookie);
	__u32 len = skb->len;

	count(RELAY_STAT_VERDICTS, 1);
	/* Verdict-only mode hands over the FIN's empty skb too; sent on to the peer it would make
	 * the psock backlog's send return 0, which the kernel reports on the peer as EPIPE. The FIN
	 * itself is already recorded in the socket's state, which user space propagates. */
	if (len == 0)
		return SK_DROP;
	if (!peer) {
		count(RELAY_STAT_NO_PEER, 1);
		return SK_PASS;
	}
	__u64 peer_cookie = *peer;
	long verdict = bpf_sk_redirect_hash(skb, &targets, &peer_cookie, 0 /* peer's egress */);
	if (verdict == SK_PASS) {
		count(RELAY_STAT_REDIRECTED, 1);
		count(RELAY_STAT_BYTES, len);
	} else {
		count(RELAY_STAT_DROPPED, 1);
	}
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
