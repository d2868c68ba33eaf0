// SPDX-License-Identifier: GPL-2.0
/* calibrate: the bare sk_msg redirect that `accel on` measures against plain loopback TCP to
 * choose its default --small-write (relay/accel/calibrate.rs). Two sockets of one loopback
 * connection join `cal_socks`, keyed by their local port; `cal_peers` maps each socket's local
 * port to its peer's. Every sendmsg of a member goes straight into the peer's receive queue, as
 * accel_msg does for a redirected connection. Nothing else is ever in these maps, and they die
 * with the measuring process. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 4);
	__type(key, __u32);   /* local port */
	__type(value, __u32); /* socket fd on update */
} cal_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, __u32);   /* local port */
	__type(value, __u32); /* the peer's local port */
} cal_peers SEC(".maps");

SEC("sk_msg")
int cal_msg(struct sk_msg_md *msg)
{
	__u32 port = msg->local_port;
	__u32 *peer = bpf_map_lookup_elem(&cal_peers, &port);
	if (!peer)
		return SK_PASS;
	__u32 key = *peer;
	return bpf_msg_redirect_hash(msg, &cal_socks, &key, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
