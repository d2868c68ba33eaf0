// SPDX-License-Identifier: GPL-2.0
/* accel: loopback acceleration for the TCP connections of one cgroup.
 *
 * `accel_sockops` runs on the cgroup: when a TCP connection is established (either side), its
 * socket joins `accel_socks`, a SOCKHASH keyed by the five-tuple as seen from that socket.
 * `accel_msg`, attached to that map, runs on every sendmsg of a member socket: it looks up the
 * peer with the swapped key and, when the peer is a member too, moves the data straight into the
 * peer's receive queue (BPF_F_INGRESS), skipping TCP/IP. When the peer is not a member (a remote
 * host, a process outside the cgroup) the data takes the normal path, unchanged.
 *
 * IPv4 addresses are stored as IPv4-mapped IPv6 (::ffff:a.b.c.d), so an AF_INET socket and an
 * AF_INET6 socket talking over a v4-mapped address produce matching keys. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "skrelay.h"

#define MAX_SOCKETS 65536
#define MAX_PORTS 1024
#define EBUSY 16
#define TCP_CLOSE 7
#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, __u32);
} accel_socks SEC(".maps");

/* The keys of the sockets in `accel_socks`, to tell whether a new socket's peer joined before it
 * (that makes a connection with both ends accelerated). Entries leave when the socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, __u64); /* socket cookie */
} accel_members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);  /* port, host byte order */
	__type(value, __u8);
} accel_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct accel_config);
} accel_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ACCEL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} accel_stats SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&accel_stats, &idx);
	if (v)
		*v += n; /* per-CPU slot: no atomics needed */
}

static __always_inline void set_stat(__u32 idx, __u64 value)
{
	__u64 *v = bpf_map_lookup_elem(&accel_stats, &idx);
	if (v)
		*v = value;
}

static __always_inline void v4_mapped(__u32 *ip6, __u32 ip4)
{
	ip6[0] = 0;
	ip6[1] = 0;
	ip6[2] = bpf_htonl(0x0000ffff);
	ip6[3] = ip4;
}

static __always_inline int port_allowed(__u32 local_port, __u32 remote_port)
{
	__u32 zero = 0;
	struct accel_config *cfg = bpf_map_lookup_elem(&accel_config, &zero);
	if (!cfg || !cfg->filter_ports)
		return 1;
	return bpf_map_lookup_elem(&accel_ports, &local_port) || bpf_map_lookup_elem(&accel_ports, &remote_port);
}

/* The socket's own key: local end first. */
static __always_inline int sockops_key(struct bpf_sock_ops *ops, struct sock_key *k)
{
	if (ops->family == AF_INET) {
		v4_mapped(k->local_ip6, ops->local_ip4);
		v4_mapped(k->remote_ip6, ops->remote_ip4);
	} else if (ops->family == AF_INET6) {
		k->local_ip6[0] = ops->local_ip6[0];
		k->local_ip6[1] = ops->local_ip6[1];
		k->local_ip6[2] = ops->local_ip6[2];
		k->local_ip6[3] = ops->local_ip6[3];
		k->remote_ip6[0] = ops->remote_ip6[0];
		k->remote_ip6[1] = ops->remote_ip6[1];
		k->remote_ip6[2] = ops->remote_ip6[2];
		k->remote_ip6[3] = ops->remote_ip6[3];
	} else {
		return 0;
	}
	k->local_port = ops->local_port;                  /* host order */
	k->remote_port = bpf_ntohl(ops->remote_port);     /* big-endian in the upper 16 bits */
	return 1;
}

static __always_inline void swap_key(const struct sock_key *k, struct sock_key *peer)
{
	for (int i = 0; i < 4; i++) {
		peer->local_ip6[i] = k->remote_ip6[i];
		peer->remote_ip6[i] = k->local_ip6[i];
	}
	peer->local_port = k->remote_port;
	peer->remote_port = k->local_port;
}

static __always_inline void join(struct bpf_sock_ops *ops)
{
	struct sock_key k = {}, peer = {};
	if (!sockops_key(ops, &k) || !port_allowed(k.local_port, k.remote_port))
		return;
	long err = bpf_sock_hash_update(ops, &accel_socks, &k, BPF_NOEXIST);
	if (err) {
		count(err == -EBUSY ? ACCEL_STAT_INSERT_BUSY : ACCEL_STAT_INSERT_FAILED, 1);
		set_stat(ACCEL_STAT_LAST_ERRNO, (__u64)-err);
		return;
	}
	count(ACCEL_STAT_SOCKETS, 1);
	__u64 cookie = bpf_get_socket_cookie(ops);
	bpf_map_update_elem(&accel_members, &k, &cookie, BPF_ANY);
	/* Told when the socket closes, to drop its `accel_members` entry. */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	swap_key(&k, &peer);
	if (bpf_map_lookup_elem(&accel_members, &peer))
		count(ACCEL_STAT_CONNECTIONS, 1);
}

static __always_inline void leave(struct bpf_sock_ops *ops)
{
	struct sock_key k = {};
	if (!sockops_key(ops, &k))
		return;
	__u64 *cookie = bpf_map_lookup_elem(&accel_members, &k);
	if (cookie && *cookie == bpf_get_socket_cookie(ops))
		bpf_map_delete_elem(&accel_members, &k);
}

SEC("sockops")
int accel_sockops(struct bpf_sock_ops *ops)
{
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		join(ops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == TCP_CLOSE)
			leave(ops);
		break;
	default:
		break;
	}
	return 1;
}

SEC("sk_msg")
int accel_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {};
	/* The peer's key is this socket's key with local and remote swapped. */
	if (msg->family == AF_INET) {
		v4_mapped(peer.local_ip6, msg->remote_ip4);
		v4_mapped(peer.remote_ip6, msg->local_ip4);
	} else if (msg->family == AF_INET6) {
		peer.local_ip6[0] = msg->remote_ip6[0];
		peer.local_ip6[1] = msg->remote_ip6[1];
		peer.local_ip6[2] = msg->remote_ip6[2];
		peer.local_ip6[3] = msg->remote_ip6[3];
		peer.remote_ip6[0] = msg->local_ip6[0];
		peer.remote_ip6[1] = msg->local_ip6[1];
		peer.remote_ip6[2] = msg->local_ip6[2];
		peer.remote_ip6[3] = msg->local_ip6[3];
	} else {
		return SK_PASS;
	}
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;

	__u32 size = msg->size;
	if (bpf_msg_redirect_hash(msg, &accel_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(ACCEL_STAT_MESSAGES, 1);
		count(ACCEL_STAT_BYTES, size);
	} else {
		count(ACCEL_STAT_FALLBACKS, 1);
	}
	/* Without a redirect target SK_PASS sends the data down the normal TCP path. */
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
