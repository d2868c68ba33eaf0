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
#include <bpf/bpf_core_read.h>
#include "skrelay.h"

/* Kernel socket fields the sk_msg program reads. sk_msg programs cannot take a reference on
 * another socket (no bpf_sk_release there), so each socket's address is kept in its
 * `accel_members` entry and read with bpf_probe_read_kernel (BPF_CORE_READ), which tolerates a
 * socket freed meanwhile; the cookie read beside it proves the address is still that socket.
 * preserve_access_index makes clang emit CO-RE relocations, resolved against the running
 * kernel's BTF at load time, so no offset is hard-coded. */
typedef struct {
	int counter;
} atomic_t;

typedef struct {
	long long counter;
} atomic64_t;

struct list_head {
	struct list_head *next;
} __attribute__((preserve_access_index));

struct wait_queue_head {
	struct list_head head;
} __attribute__((preserve_access_index));

struct wait_queue_entry {
	void *func;
	struct list_head entry;
} __attribute__((preserve_access_index));

struct socket_wq {
	struct wait_queue_head wait;
} __attribute__((preserve_access_index));

struct file {
	unsigned int f_flags;
} __attribute__((preserve_access_index));

struct socket {
	struct file *file;
} __attribute__((preserve_access_index));

typedef struct {
	int owned;
} __attribute__((preserve_access_index)) socket_lock_t;

struct refcount_struct {
	atomic_t refs;
} __attribute__((preserve_access_index));

struct sk_psock {
	struct list_head ingress_msg;
	struct refcount_struct refcnt;
} __attribute__((preserve_access_index));

/* Bits of sk_flags (their numbers come from the running kernel's BTF). */
enum sock_flags {
	SOCK_RCVTSTAMP = 11,
	SOCK_RCVTSTAMPNS = 12,
	SOCK_TIMESTAMPING_RX_SOFTWARE = 15,
	SOCK_ZEROCOPY = 18,
};

/* sk_user_data carries flag bits below the psock pointer (SK_USER_DATA_PTRMASK). */
#define SK_USER_DATA_PTRMASK (~7UL)

typedef struct {
	long counter;
} atomic_long_t;

struct proto {
	atomic_long_t *memory_allocated;
	unsigned long *memory_pressure;
	long *sysctl_mem;
} __attribute__((preserve_access_index));

/* A memory cgroup's page counter (mm/page_counter.h): pages charged, and the limit. */
struct page_counter {
	atomic_long_t usage;
	unsigned long max;
	struct page_counter *parent;
} __attribute__((preserve_access_index));

/* cgroup v1's TCP memory limit (memory.kmem.tcp.limit_in_bytes; CONFIG_MEMCG_V1): `tcpmem` counts
 * the pages of the cgroup's sockets, enforced once a limit was set (`tcpmem_active`). */
struct mem_cgroup {
	struct page_counter tcpmem;
	_Bool tcpmem_active;
	int tcpmem_pressure;
} __attribute__((preserve_access_index));

struct sock_common {
	atomic64_t skc_cookie;
	struct proto *skc_prot;
	unsigned long skc_flags; /* sk_flags, since 6.x */
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct {
		atomic_t rmem_alloc;
	} __attribute__((preserve_access_index)) sk_backlog;
	int sk_rcvbuf;
	int sk_rcvlowat;
	unsigned long sk_flags;
	int sk_peek_off;
	struct socket_wq *sk_wq;
	struct socket *sk_socket;
	socket_lock_t sk_lock;
	void *sk_user_data;
	struct mem_cgroup *sk_memcg;
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u32 rcv_nxt;
	__u32 copied_seq;
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

#define O_NONBLOCK 04000

#define ACCEL_DEFAULT_MAX_QUEUED (4u << 20)
/* A direction gives up the redirect (STUCK) once its sends by the in-map TCP path, while paused,
 * outrun its redirected sends by STUCK_LIMITS limits (`debt_kib`): the in-map TCP path is
 * 0.5-0.8x plain TCP, so a connection that spends most of its bytes there is better off as
 * plain TCP, while one whose pauses are short and resume keeps the redirect. The rule used to be
 * time-based (10 ms and one limit of TCP-path bytes in one pause), but on a busy machine a reader
 * waits 10 ms and more for a CPU while its writer runs (traced: the redirect queue stood still at
 * its limit for the whole pause), so every bulk connection gave up at its first pause.
 * How long to wait depends on whether the reader has a CPU to catch up with: one bulk connection
 * resumes after up to 100-250 MiB of TCP path (its reader was a few MiB behind when it started),
 * and at 8 limits one 1 s run in three gave up and lost its 2x (none of 6 at 32). With more live
 * connections than CPUs (STUCK_LIMITS_CROWDED) the readers are starved, pauses rarely resume and
 * every limit spent on the in-map TCP path is lost (30% of the bytes at 1 MiB writes x 16
 * connections gave up only after 8): 2 limits took those cells from 0.95-0.98x plain to
 * 1.04-1.09x (BENCHMARKS.md). */
#define STUCK_LIMITS 32
#define STUCK_LIMITS_CROWDED 2
/* CPUs scanned for the live-sockets gauge (a per-CPU counter): the most this build counts. */
#define MAX_CPUS 1024
#define EBUSY 16
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define TCP_CLOSING 11
#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, __u32);
} accel_socks SEC(".maps");

/* Where a member socket's connection stands. The connecting end joins first (PENDING); the
 * accepted end moves it to JOINED once it is in `accel_socks` itself. If the connecting end sends
 * before that, it claims FALLBACK instead: those bytes take the normal path, so every later byte
 * must too (a redirect would overtake them), and the accepted end then stays out and removes the
 * connecting end from the map. compare-and-swap settles the race between the two. */
enum member_state { PENDING = 0, JOINED = 1, FALLBACK = 2 };

struct member {
	__u64 cookie;
	__u64 state;
	__u64 sk_addr; /* the socket's kernel address (see struct sock above) */
	/* This socket's sending direction, changed only by its own sk_msg runs (which hold the
	 * socket lock): see enum direction_mode. */
	__u32 mode;
	__u32 small_streak; /* consecutive small sends that found the peer with unread data */
	__u32 leaving;      /* set (xchg) when this socket starts leaving the map: the peer stops redirecting */
	__u32 debt_kib;     /* KiB sent by TCP while paused less KiB redirected since, never below 0 */
	__u64 paused_bytes; /* bytes sent by TCP since the direction last paused (informational) */
	__u64 paused_at;    /* bpf_ktime_get_ns() when it last paused (informational) */
	__u32 join_seq;     /* snd_nxt when the socket joined: see sent_around_the_map */
	__u32 seq_checked;  /* its first sk_msg run compared write_seq with join_seq */
};

/* REDIRECT: sends go straight into the peer's redirect queue. PAUSED: the peer held its limit
 * unread, so sends take the TCP path, where the peer's receive window holds the sender back
 * (a redirect never waits), until the way back keeps byte order (see order_safe). STUCK: its
 * TCP-path sends outran its redirected ones by STUCK_LIMITS limits (a writer that keeps ahead of
 * its reader rarely lets the TCP path drain). SENT_AROUND: bytes went by TCP without passing
 * sk_msg (see sent_around_the_map). UNHONOURED: a socket option the redirect ignores is set (see
 * unhonoured_writer). DEMOTED_SMALL, STUCK, SENT_AROUND, UNHONOURED and PEER_GONE:
 * the TCP path for the connection's life (and out of the map, see try_leave). */
enum direction_mode {
	REDIRECT = 0,
	PAUSED = 1,
	DEMOTED_SMALL = 2,
	PEER_GONE = 3,
	LEFT = 4,
	STUCK = 5,
	SENT_AROUND = 6,
	UNHONOURED = 7,
};

/* Every socket in `accel_socks` (entries leave when the socket closes). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, struct member);
} accel_members SEC(".maps");

/* Listening sockets of the cgroup, keyed by local address and port (remote part zero; a wildcard
 * address is all zeros). A connecting socket joins only when it dials one of these: a socket
 * whose peer never joins must stay out of the map, because a blocking recv on a member socket
 * can fail with EAGAIN when bytes arrive by the normal path (seen on 6.18). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, __u64); /* socket cookie */
} accel_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ACCEL_MAX_PORTS);
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

/* The live-sockets gauge: each CPU's slot moves by atomic adds (a socket may join on one CPU and
 * close on another, so one slot can wrap below zero); the sum over CPUs is the gauge. */
static __always_inline void live_sockets_add(__s64 n)
{
	__u32 idx = ACCEL_STAT_LIVE_SOCKETS;
	__u64 *v = bpf_map_lookup_elem(&accel_stats, &idx);
	if (v)
		__sync_fetch_and_add(v, n);
}

/* More live connections (two sockets each) than CPUs: see STUCK_LIMITS. */
static __always_inline int crowded(const struct accel_config *cfg)
{
	__u32 idx = ACCEL_STAT_LIVE_SOCKETS;
	__u64 sockets = 0;
	for (__u32 cpu = 0; cpu < MAX_CPUS; cpu++) {
		__u64 *v = bpf_map_lookup_percpu_elem(&accel_stats, &idx, cpu);
		if (!v)
			break;
		sockets += *v;
	}
	__u32 cpus = cfg && cfg->cpus ? cfg->cpus : 1;
	return (__s64)sockets > 2 * (__s64)cpus; /* the sum is never below zero */
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

static __always_inline int is_v4_mapped(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

/* The address is this host's own: loopback, or the socket's local address (the kernel picks the
 * destination as source for a local destination). */
static __always_inline int is_local(const struct sock_key *k)
{
	const __u32 *r = k->remote_ip6;
	if (r[0] == k->local_ip6[0] && r[1] == k->local_ip6[1] && r[2] == k->local_ip6[2] && r[3] == k->local_ip6[3])
		return 1;
	if (is_v4_mapped(r) && (bpf_ntohl(r[3]) >> 24) == 127)
		return 1;
	return r[0] == 0 && r[1] == 0 && r[2] == 0 && r[3] == bpf_htonl(1);
}

/* A connecting socket dials a listener of this cgroup. */
static __always_inline int dials_member_listener(const struct sock_key *k)
{
	struct sock_key l = {};
	for (int i = 0; i < 4; i++)
		l.local_ip6[i] = k->remote_ip6[i];
	l.local_port = k->remote_port;
	if (bpf_map_lookup_elem(&accel_listeners, &l))
		return 1;
	if (!is_local(k))
		return 0;
	/* A wildcard listener (0.0.0.0 or ::) of the cgroup on this port. */
	for (int i = 0; i < 4; i++)
		l.local_ip6[i] = 0;
	return bpf_map_lookup_elem(&accel_listeners, &l) != 0;
}

/* The key a listener is tracked under: its local address and port only; 0.0.0.0 and :: are
 * the same wildcard. */
static __always_inline int listener_key(struct bpf_sock_ops *ops, struct sock_key *k)
{
	if (!sockops_key(ops, k))
		return 0;
	for (int i = 0; i < 4; i++)
		k->remote_ip6[i] = 0;
	k->remote_port = 0;
	if (is_v4_mapped(k->local_ip6) && k->local_ip6[3] == 0)
		k->local_ip6[2] = 0;
	return 1;
}

static __always_inline void track_listener(struct bpf_sock_ops *ops)
{
	struct sock_key k = {};
	if (!listener_key(ops, &k))
		return;
	__u64 cookie = bpf_get_socket_cookie(ops);
	bpf_map_update_elem(&accel_listeners, &k, &cookie, BPF_ANY);
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void untrack_listener(struct bpf_sock_ops *ops)
{
	struct sock_key k = {};
	if (!listener_key(ops, &k))
		return;
	__u64 *cookie = bpf_map_lookup_elem(&accel_listeners, &k);
	if (cookie && *cookie == bpf_get_socket_cookie(ops))
		bpf_map_delete_elem(&accel_listeners, &k);
}

/* Socket options whose work is done on the TCP path, which a redirected message skips (a new-user
 * pass): MSG_ZEROCOPY's completions (a sender that waits for them hung: tcp_bpf_sendmsg copies and
 * never reports one), receive timestamps (SO_TIMESTAMP, SO_TIMESTAMPNS, SO_TIMESTAMPING's
 * software receive stamp: no cmsg came), SO_PEEK_OFF (every peek read from offset 0) and
 * SO_RCVLOWAT (poll and recv woke for less). A connection with one of them set stays on TCP:
 * checked at the join on both sockets, and before each redirect on the writer (ZEROCOPY) and on
 * the reader (the others), since they may be set at any time. Not seen from here (left on the
 * redirect, README): SO_TIMESTAMPING's transmit stamps, TCP_INQ, TCP_CORK and MSG_MORE. */
static __always_inline unsigned long sock_flags_of(struct sock *sk)
{
	if (bpf_core_field_exists(sk->__sk_common.skc_flags))
		return BPF_CORE_READ(sk, __sk_common.skc_flags);
	return BPF_CORE_READ(sk, sk_flags);
}

static __always_inline int unhonoured_writer(struct sock *sk)
{
	unsigned long flags = sock_flags_of(sk);
	return (flags >> bpf_core_enum_value(enum sock_flags, SOCK_ZEROCOPY)) & 1;
}

static __always_inline int unhonoured_reader(struct sock *sk)
{
	unsigned long flags = sock_flags_of(sk);
	unsigned long stamps = (1UL << bpf_core_enum_value(enum sock_flags, SOCK_RCVTSTAMP)) |
			       (1UL << bpf_core_enum_value(enum sock_flags, SOCK_RCVTSTAMPNS)) |
			       (1UL << bpf_core_enum_value(enum sock_flags, SOCK_TIMESTAMPING_RX_SOFTWARE));
	return (flags & stamps) || BPF_CORE_READ(sk, sk_peek_off) >= 0 || BPF_CORE_READ(sk, sk_rcvlowat) > 1;
}

/* The socket has sent or received payload already, or has some in flight: TCP Fast Open puts
 * data in the SYN (the connecting end's sendto(MSG_FASTOPEN), TCP_FASTOPEN_CONNECT), and a TFO
 * server may write before the handshake ends. Those bytes took TCP, so a redirect after them would
 * reach the reader first (it takes its redirect queue before its TCP queue): such a connection
 * stays out, as one whose connecting end sent before its peer joined. */
static __always_inline int moved_payload(struct bpf_sock_ops *ops)
{
	return ops->data_segs_out || ops->data_segs_in || ops->snd_nxt != ops->snd_una;
}

/* Both ends of a connection join, or neither: the connecting end when it dials a listener of
 * the cgroup (ACTIVE_ESTABLISHED comes first on loopback), the accepted end when its peer joined
 * and has not sent anything yet. */
/* `accel off` ran: sockops stays for the sockets that joined, and no new one joins. */
static __always_inline int draining(void)
{
	__u32 zero = 0;
	struct accel_config *cfg = bpf_map_lookup_elem(&accel_config, &zero);
	return cfg && (cfg->flags & ACCEL_FLAG_DRAINING);
}

static __always_inline void join(struct bpf_sock_ops *ops, int active)
{
	struct sock_key k = {}, peer = {};
	struct member *peer_member = 0;
	if (!sockops_key(ops, &k) || !port_allowed(k.local_port, k.remote_port))
		return;
	swap_key(&k, &peer);
	if (active) {
		if (draining() || !dials_member_listener(&k))
			return;
		if (moved_payload(ops)) {
			/* TCP Fast Open data in the SYN: a later redirect would overtake it. */
			count(ACCEL_STAT_RACES_LOST, 1);
			return;
		}
	} else {
		peer_member = bpf_map_lookup_elem(&accel_members, &peer);
		if (!peer_member)
			return;
		if (draining()) {
			/* The connecting end joined before `off`: it leaves, as when it lost a race. */
			bpf_map_delete_elem(&accel_socks, &peer);
			return;
		}
		if (peer_member->state != PENDING || moved_payload(ops)) {
			/* The connecting end already sent by the normal path: it leaves the map too. */
			bpf_map_delete_elem(&accel_socks, &peer);
			count(ACCEL_STAT_RACES_LOST, 1);
			return;
		}
	}
	struct member me = {
		.cookie = bpf_get_socket_cookie(ops),
		.state = active ? PENDING : JOINED,
		.sk_addr = (__u64)(unsigned long)ops->sk,
		.join_seq = ops->snd_nxt,
	};
	/* A stale entry of the same five-tuple (none is expected: entries leave at TCP_CLOSE) is
	 * replaced without counting it twice in the gauge. */
	if (bpf_map_update_elem(&accel_members, &k, &me, BPF_NOEXIST) == 0)
		live_sockets_add(1);
	else
		bpf_map_update_elem(&accel_members, &k, &me, BPF_ANY);
	/* The address read back from the map is a plain number, which CO-RE reads may offset
	 * (the context's socket pointer may not be). */
	struct member *mine = bpf_map_lookup_elem(&accel_members, &k);
	struct sock *sk = mine ? (struct sock *)(unsigned long)mine->sk_addr : 0;
	if (sk && (unhonoured_writer(sk) || unhonoured_reader(sk))) {
		if (bpf_map_delete_elem(&accel_members, &k) == 0)
			live_sockets_add(-1);
		if (!active)
			bpf_map_delete_elem(&accel_socks, &peer); /* the connecting end leaves too */
		count(ACCEL_STAT_RACES_LOST, 1);
		return;
	}
	long err = bpf_sock_hash_update(ops, &accel_socks, &k, BPF_NOEXIST);
	if (err) {
		if (bpf_map_delete_elem(&accel_members, &k) == 0)
			live_sockets_add(-1);
		count(err == -EBUSY ? ACCEL_STAT_INSERT_BUSY : ACCEL_STAT_INSERT_FAILED, 1);
		set_stat(ACCEL_STAT_LAST_ERRNO, (__u64)-err);
		return;
	}
	/* Told when the socket closes, to drop its `accel_members` entry, and of RTT samples (only
	 * TCP-path sends produce them) to leave the map when its sends took the TCP path. */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG |
					       BPF_SOCK_OPS_RTT_CB_FLAG);
	if (active) {
		count(ACCEL_STAT_SOCKETS, 1);
		return;
	}
	if (__sync_val_compare_and_swap(&peer_member->state, PENDING, JOINED) != PENDING) {
		/* The connecting end already sent by the normal path: both ends leave the map. */
		bpf_map_delete_elem(&accel_socks, &k);
		if (bpf_map_delete_elem(&accel_members, &k) == 0)
			live_sockets_add(-1);
		bpf_map_delete_elem(&accel_socks, &peer);
		count(ACCEL_STAT_RACES_LOST, 1);
		return;
	}
	count(ACCEL_STAT_SOCKETS, 1);
	count(ACCEL_STAT_CONNECTIONS, 1);
}

static __always_inline struct sk_psock *psock_of(struct sock *sk)
{
	unsigned long data = (unsigned long)BPF_CORE_READ(sk, sk_user_data);
	return (struct sk_psock *)(data & SK_USER_DATA_PTRMASK);
}

/* A socket whose own sends take the TCP path for good (small writes, STUCK), or that is paused
 * with a peer whose blocking reader keeps it from resuming, leaves the map: in it, even the TCP path
 * runs through tcp_bpf_sendmsg, which measured 0.6-0.8x plain TCP. Leaving drops the socket's
 * psock, which frees whatever waits in its redirect queue, so it leaves only when that queue is
 * empty and no redirect into it can still come: `leaving` is set first (the peer's sk_msg reads
 * it before every redirect and then takes the TCP path for good), then the peer's psock must
 * have no other holder than the map, i.e. no sendmsg of the peer is running (a redirect the
 * peer decided before `leaving` is still inside its sendmsg). Both are locked instructions on
 * x86 (xchg here, the psock refcount increment there), so one of the two sides sees the other.
 * Runs on RTT samples, which only TCP-path sends produce.
 *
 * A socket that sent its FIN (`closing`) leaves too, whatever its mode: in the map, a reader
 * blocked in recv is woken by the ACK of that FIN without data and tcp_bpf_recvmsg returns EAGAIN
 * (kernel 6.18); plain TCP keeps waiting. It has nothing more to send, so nothing is lost. */
/* Once this socket has left the map nothing can redirect into its peer any more (only this
 * socket ever did), so the peer leaves too as soon as its reader has taken every redirected byte:
 * in the map its reads go through tcp_bpf_recvmsg, measured up to 3x slower than plain TCP for
 * curl reading 16 KiB at a time. Then this socket needs no more RTT callbacks. */
static __always_inline void take_peer_out(struct bpf_sock_ops *ops, struct sock_key *peer, struct member *pm,
					  struct sock *psk)
{
	/* A sendmsg of this socket still running (it holds the psock; one of another thread could
	 * still be inside its last redirect) keeps the peer in: retry at the next RTT sample. */
	struct sock *me_sk = 0;
	struct sock_key k = {};
	if (sockops_key(ops, &k)) {
		struct member *me = bpf_map_lookup_elem(&accel_members, &k);
		if (me)
			me_sk = (struct sock *)(unsigned long)me->sk_addr;
	}
	if (!me_sk || psock_of(me_sk))
		return;
	if (pm && psk && !pm->leaving && BPF_CORE_READ(psk, __sk_common.skc_cookie.counter) == pm->cookie) {
		struct sk_psock *pps = psock_of(psk);
		if (pps) {
			struct list_head *first = BPF_CORE_READ(pps, ingress_msg.next);
			if (first != &pps->ingress_msg)
				return; /* its reader has redirected bytes to take first: next RTT sample */
		}
		__sync_lock_test_and_set(&pm->leaving, 1);
		if (pps && bpf_map_delete_elem(&accel_socks, peer) == 0)
			count(ACCEL_STAT_LEFT, 1);
	}
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
}

/* Threads blocked in recvmsg on `sk` (at most 8 looked at): wait-queue entries woken by
 * woken_wake_function, as sk_wait_event's are. A reader blocked in tcp_bpf_recvmsg holds a psock
 * reference while it waits, which try_leave would otherwise take for a sendmsg in progress: a
 * server blocked reading until EOF kept its client in the map at the client's FIN, and the
 * client's blocking recv then failed with EAGAIN when the FIN's ACK woke it (30 of 30 such
 * exchanges, a new-user pass). Also counted: a sender waiting for memory in tcp_bpf_sendmsg
 * (holds a reference too, but no redirect is under way: its next one reads `leaving`), and a
 * reader blocked in plain tcp_recvmsg (MSG_WAITALL), which holds none, so a sendmsg of another
 * thread in the middle of a redirect could then pass for it (KERNEL-NOTES, accel). 0 where the
 * address is unknown. */
static __always_inline int blocked_readers(struct sock *sk)
{
	__u32 zero = 0;
	struct accel_config *cfg = bpf_map_lookup_elem(&accel_config, &zero);
	if (!cfg || !cfg->woken_wake_function)
		return 0;
	struct socket_wq *wq = BPF_CORE_READ(sk, sk_wq);
	if (!wq)
		return 0;
	struct list_head *head = &wq->wait.head;
	struct list_head *pos = BPF_CORE_READ(wq, wait.head.next);
	int n = 0;
	for (int i = 0; i < 8; i++) {
		if (pos == head)
			break;
		struct wait_queue_entry *e =
			(void *)((char *)pos - bpf_core_field_offset(struct wait_queue_entry, entry));
		if ((__u64)(unsigned long)BPF_CORE_READ(e, func) == cfg->woken_wake_function)
			n++;
		pos = BPF_CORE_READ(pos, next);
	}
	return n;
}

static __always_inline void try_leave(struct bpf_sock_ops *ops, int closing)
{
	struct sock_key k = {}, peer = {};
	if (!sockops_key(ops, &k))
		return;
	struct member *me = bpf_map_lookup_elem(&accel_members, &k);
	if (!me || me->cookie != bpf_get_socket_cookie(ops) || me->state == FALLBACK)
		return;
	swap_key(&k, &peer);
	struct member *pm = bpf_map_lookup_elem(&accel_members, &peer);
	struct sock *psk = pm ? (struct sock *)(unsigned long)pm->sk_addr : 0;
	if (me->mode == LEFT) {
		take_peer_out(ops, &peer, pm, psk);
		return;
	}
	if (me->mode == REDIRECT && !closing)
		return;
	if (me->mode == PAUSED && !closing)
		return; /* it may still resume (order_safe); STUCK when it cannot */
	__sync_lock_test_and_set(&me->leaving, 1);
	if (psk && BPF_CORE_READ(psk, __sk_common.skc_cookie.counter) == pm->cookie) {
		struct sk_psock *pps = psock_of(psk);
		if (pps && BPF_CORE_READ(pps, refcnt.refs.counter) - 1 > blocked_readers(psk))
			return; /* the peer may be inside sendmsg: try again at the next RTT sample */
	}
	struct sock *sk = (struct sock *)(unsigned long)me->sk_addr;
	struct sk_psock *ps = psock_of(sk);
	if (!ps)
		return;
	struct list_head *first = BPF_CORE_READ(ps, ingress_msg.next);
	if (first != &ps->ingress_msg)
		return; /* the reader has not taken every redirected byte yet */
	if (bpf_map_delete_elem(&accel_socks, &k) == 0) {
		me->mode = LEFT;
		count(ACCEL_STAT_LEFT, 1);
		take_peer_out(ops, &peer, pm, psk);
	}
}

static __always_inline void leave(struct bpf_sock_ops *ops)
{
	struct sock_key k = {};
	if (!sockops_key(ops, &k))
		return;
	struct member *m = bpf_map_lookup_elem(&accel_members, &k);
	if (m && m->cookie == bpf_get_socket_cookie(ops) && bpf_map_delete_elem(&accel_members, &k) == 0)
		live_sockets_add(-1);
}

SEC("sockops")
int accel_sockops(struct bpf_sock_ops *ops)
{
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		join(ops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		join(ops, 0);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		track_listener(ops);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		try_leave(ops, ops->state == TCP_FIN_WAIT1 || ops->state == TCP_FIN_WAIT2 || ops->state == TCP_CLOSING);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == TCP_FIN_WAIT1) {
			try_leave(ops, 1);
		} else if (ops->args[1] == TCP_CLOSE) {
			if (ops->args[0] == TCP_LISTEN)
				untrack_listener(ops);
			else
				leave(ops);
		}
		break;
	default:
		break;
	}
	return 1;
}

/* Whether a paused direction (this socket -> peer) may go back to the redirect without
 * reordering: every byte it sent by TCP has reached the peer (all acknowledged) and the peer's
 * reader has taken it (copied_seq caught up with rcv_nxt), so a redirected message cannot
 * overtake TCP bytes. One more case would reorder or hang: a reader blocked inside plain
 * tcp_recvmsg (entered while TCP bytes were there, waiting for more with MSG_WAITALL or
 * SO_RCVLOWAT) waits on the TCP receive queue only, and would take later TCP bytes before
 * redirected ones, or wait for TCP bytes that never come. Such a reader either holds the socket
 * lock or sits on the socket's wait queue without a psock reference, and a non-blocking socket
 * never blocks there (see the blocking case below). */
static __always_inline int order_safe(const struct member *me, struct sock *psk)
{
	struct tcp_sock *tp = (struct tcp_sock *)(unsigned long)me->sk_addr;
	struct tcp_sock *ptp = (struct tcp_sock *)psk;
	if (BPF_CORE_READ(tp, snd_una) != BPF_CORE_READ(tp, write_seq))
		return 0;
	if (BPF_CORE_READ(ptp, rcv_nxt) != BPF_CORE_READ(ptp, copied_seq))
		return 0;
	unsigned int f_flags = BPF_CORE_READ(psk, sk_socket, file, f_flags);
	if (f_flags & O_NONBLOCK)
		return 1;
	if (BPF_CORE_READ(psk, sk_rcvlowat) > 1)
		return 0;
	if (BPF_CORE_READ(psk, sk_lock.owned))
		return 0;
	/* A blocking reader that waits for data inside tcp_bpf_recvmsg (tcp_msg_wait_data) waits
	 * for either queue and takes the redirect queue first: resuming is safe. One blocked inside
	 * plain tcp_recvmsg (MSG_WAITALL) waits on the TCP queue only. tcp_bpf_recvmsg holds a
	 * psock reference while it waits and drops it before it calls tcp_recvmsg, so: every
	 * waiter on the socket's wait queue must be matched by a psock reference beyond the map's
	 * own (a waiter without one is in tcp_recvmsg, or a poll/epoll entry: no resume). This
	 * socket's own psock must hold only the map's and this sendmsg's references, so that no
	 * other thread of ours is inside a redirect into the peer (which holds a reference on the
	 * peer's psock too). */
	struct sk_psock *ps = psock_of((struct sock *)(unsigned long)me->sk_addr);
	struct sk_psock *pps = psock_of(psk);
	if (!ps || !pps || BPF_CORE_READ(ps, refcnt.refs.counter) != 2)
		return 0;
	struct socket_wq *wq = BPF_CORE_READ(psk, sk_wq);
	if (!wq)
		return 0;
	int refs = BPF_CORE_READ(pps, refcnt.refs.counter) - 1;
	struct list_head *head = &wq->wait.head;
	struct list_head *pos = BPF_CORE_READ(wq, wait.head.next);
	int waiters = 0;
	for (int i = 0; i < 8; i++) {
		if (pos == head)
			return waiters <= refs && !BPF_CORE_READ(psk, sk_lock.owned);
		waiters++;
		pos = BPF_CORE_READ(pos, next);
	}
	return 0;
}

/* The reader's memory cgroup could not take `size` more bytes of socket memory: under cgroup v1's
 * TCP limit, its pressure flag is up or the message would come within a quarter of the limit
 * (at least 16 pages) of its `tcpmem` counter or of an ancestor's, which v1
 * charges too (a re-check: a 2M limit on the parent of a cgroup limited to 64M still failed).
 * A memory-cgroup limit made the redirect fail as tcp_mem does below (a helper's pass: writers
 * under memory.kmem.tcp.limit_in_bytes 2M stopped with ENOMEM in 2 runs of 3, and one hung,
 * where plain TCP in the same cgroup moved every byte). cgroup v2 charges socket memory with
 * reclaim (GFP_KERNEL in sendmsg) and is not checked. Sixteen levels are looked at (a limit
 * nine above the reader was missed at eight: a re-check). */
#define MEMCG_LEVELS 16
static __always_inline int memcg_short(struct sock *psk, __u32 size)
{
	struct mem_cgroup *memcg = BPF_CORE_READ(psk, sk_memcg);
	if (!memcg || !bpf_core_field_exists(memcg->tcpmem_active) || !BPF_CORE_READ(memcg, tcpmem_active))
		return 0;
	if (BPF_CORE_READ(memcg, tcpmem_pressure))
		return 1;
	struct page_counter *counter = __builtin_preserve_access_index(&memcg->tcpmem);
	for (int level = 0; level < MEMCG_LEVELS && counter; level++) {
		long usage = BPF_CORE_READ(counter, usage.counter);
		unsigned long max = BPF_CORE_READ(counter, max);
		/* A quarter of the limit (at least 16 pages) kept free: both directions and the TCP
		 * path charge the same counters between this check and the redirect's charge. */
		unsigned long slack = max / 4 > 16 ? max / 4 : 16;
		if (usage >= 0 && (unsigned long)usage + (size >> 12) + slack > max)
			return 1;
		counter = BPF_CORE_READ(counter, parent);
	}
	return 0;
}

/* TCP memory (tcp_mem, machine-wide) is under pressure or past its pressure threshold, or the
 * reader's memory cgroup is short (memcg_short). Then a redirect can fail: bpf_tcp_ingress
 * charges the reader through sk_rmem_schedule, and when that fails the sender's write(2)
 * returns ENOMEM, where plain TCP would wait for memory (sk_stream_wait_memory). Seen in the
 * sweep while other jobs filled tcp_mem ("TCP: out of memory -- consider tuning tcp_mem"): a
 * writer stopped with ENOMEM after 2 MiB. So the direction pauses instead: the TCP path waits
 * like plain TCP. */
static __always_inline int tcp_memory_short(struct sock *psk, __u32 size)
{
	if (memcg_short(psk, size))
		return 1;
	struct proto *prot = BPF_CORE_READ(psk, __sk_common.skc_prot);
	if (!prot)
		return 0;
	unsigned long pressure = 0;
	unsigned long *pp = BPF_CORE_READ(prot, memory_pressure);
	if (pp && bpf_probe_read_kernel(&pressure, sizeof(pressure), pp) == 0 && pressure)
		return 1;
	atomic_long_t *ap = BPF_CORE_READ(prot, memory_allocated);
	long *mem = BPF_CORE_READ(prot, sysctl_mem);
	long allocated = 0, threshold = 0;
	if (!ap || !mem || bpf_probe_read_kernel(&allocated, sizeof(allocated), &ap->counter) ||
	    bpf_probe_read_kernel(&threshold, sizeof(threshold), &mem[1]))
		return 0;
	return allocated > threshold;
}

/* What a queue of `queued` unread bytes and one more message of `size` bytes costs the reader's
 * host: the bytes, which sk_rmem_alloc counts, and a struct sk_msg per message (kmalloc-1k:
 * bpf_tcp_ingress allocates one for every redirected message), which nothing counts. 100-byte
 * messages to a reader that stopped (`--small-write 0`) held 8 MiB of bytes in 84,000 messages,
 * and 81 MiB of slab. The messages are counted as if the queue were all of this size: a stream
 * of tiny messages then pauses at `limit` / (1 + SK_MSG_COST / size) bytes, and a queue built of
 * small messages holds at most about two limits in all whatever is sent after it. */
#define SK_MSG_COST 1024
static __always_inline __u64 queue_cost(__u32 queued, __u32 size)
{
	__u64 per = size ? size : 1;
	return (__u64)queued + size + ((__u64)queued / per + 1) * SK_MSG_COST;
}

/* Checked at a socket's first sk_msg run: a sendmsg that began before the socket joined the map
 * runs the plain tcp_sendmsg to its end, so its bytes take TCP without passing sk_msg. TCP Fast
 * Open without a cookie does it: sendto(MSG_FASTOPEN) sends a bare SYN, waits in the connect for
 * the handshake (during which the socket joins), then queues its data by TCP; redirected writes
 * after it overtook it (a new-user pass: 1,000 bytes arrived after the first 1 MiB). Its write
 * sequence has then moved since the join. */
static __always_inline int sent_around_the_map(const struct member *me)
{
	struct tcp_sock *tp = (struct tcp_sock *)(unsigned long)me->sk_addr;
	return BPF_CORE_READ(tp, write_seq) != me->join_seq;
}

SEC("sk_msg")
int accel_msg(struct sk_msg_md *msg)
{
	struct sock_key k = {}, peer = {};
	if (msg->family == AF_INET) {
		v4_mapped(k.local_ip6, msg->local_ip4);
		v4_mapped(k.remote_ip6, msg->remote_ip4);
	} else if (msg->family == AF_INET6) {
		k.local_ip6[0] = msg->local_ip6[0];
		k.local_ip6[1] = msg->local_ip6[1];
		k.local_ip6[2] = msg->local_ip6[2];
		k.local_ip6[3] = msg->local_ip6[3];
		k.remote_ip6[0] = msg->remote_ip6[0];
		k.remote_ip6[1] = msg->remote_ip6[1];
		k.remote_ip6[2] = msg->remote_ip6[2];
		k.remote_ip6[3] = msg->remote_ip6[3];
	} else {
		return SK_PASS;
	}
	k.local_port = msg->local_port;
	k.remote_port = bpf_ntohl(msg->remote_port);
	swap_key(&k, &peer);

	/* Redirect only once the peer has joined; a send before that claims the normal path for
	 * good (see enum member_state). */
	struct member *me = bpf_map_lookup_elem(&accel_members, &k);
	if (!me || me->state == FALLBACK) {
		count(ACCEL_STAT_FALLBACKS, 1);
		return SK_PASS;
	}
	if (me->state == PENDING && __sync_val_compare_and_swap(&me->state, PENDING, FALLBACK) == PENDING) {
		/* The accepted end removes this socket from the map when it sees FALLBACK (sk_msg
		 * programs may not delete from a SOCKHASH). */
		count(ACCEL_STAT_FALLBACKS, 1);
		return SK_PASS;
	}
	if (!me->seq_checked) {
		/* Both ends joined (a PENDING socket's first send took FALLBACK above). */
		me->seq_checked = 1;
		if (sent_around_the_map(me)) {
			me->mode = SENT_AROUND;
			count(ACCEL_STAT_RACES_LOST, 1);
		}
	}
	__u32 size = msg->size;
	if (me->mode == PEER_GONE) {
		count(ACCEL_STAT_FALLBACKS, 1);
		return SK_PASS;
	}
	if (me->mode != REDIRECT && me->mode != PAUSED) {
		/* DEMOTED_SMALL, or LEFT while a sendmsg that began in the map finishes. */
		count(ACCEL_STAT_PASSED, 1);
		count(ACCEL_STAT_PASSED_BYTES, size);
		return SK_PASS;
	}

	struct member *pm = bpf_map_lookup_elem(&accel_members, &peer);
	if (!pm) {
		/* The peer closed: the TCP path reports it (a reset, EPIPE), and every later send
		 * takes it too, so nothing can overtake these bytes. */
		me->mode = PEER_GONE;
		count(ACCEL_STAT_FALLBACKS, 1);
		return SK_PASS;
	}
	struct sock *psk = (struct sock *)(unsigned long)pm->sk_addr;
	__u64 pcookie = BPF_CORE_READ(psk, __sk_common.skc_cookie.counter);
	if (!psk || pcookie != pm->cookie || pm->leaving) {
		/* Gone, or leaving the map (try_leave): the TCP path from now on. */
		me->mode = PEER_GONE;
		count(ACCEL_STAT_FALLBACKS, 1);
		return SK_PASS;
	}
	if (unhonoured_writer((struct sock *)(unsigned long)me->sk_addr) || unhonoured_reader(psk)) {
		me->mode = UNHONOURED;
		count(ACCEL_STAT_RACES_LOST, 1);
		count(ACCEL_STAT_PASSED, 1);
		count(ACCEL_STAT_PASSED_BYTES, size);
		return SK_PASS;
	}
	/* What the peer holds unread: its receive memory, which the kernel charges for every
	 * redirected message until the reader takes it, and for its TCP receive queue. Nothing else
	 * bounds the redirect queue. The limit is --max-queued, not half the peer's receive buffer
	 * (as before): a reader that only ever took redirected bytes never had its buffer autotuned,
	 * so that cap stayed at 64 KiB and every write of 64 KiB or more paused at once, i.e. bulk
	 * never took the redirect. When a pause starts above the receive buffer, TCP grows the
	 * buffer to what the socket holds (tcp_clamp_window, up to tcp_rmem[2]) and accepts the
	 * segment; the window it then advertises holds the sender back. */
	__u32 queued = BPF_CORE_READ(psk, sk_backlog.rmem_alloc.counter);
	__u32 zero = 0;
	struct accel_config *cfg = bpf_map_lookup_elem(&accel_config, &zero);
	__u32 limit = cfg && cfg->max_queued ? cfg->max_queued : ACCEL_DEFAULT_MAX_QUEUED;

	if (me->mode == PAUSED) {
		/* Not once this socket started leaving (try_leave): it waits for the peer to be out of
		 * sendmsg, and its peer already takes the TCP path. */
		if (me->leaving || queue_cost(queued, size) > limit / 2 || tcp_memory_short(psk, size) ||
		    !order_safe(me, psk)) {
			me->paused_bytes += size;
			me->debt_kib += (size + 1023) >> 10;
			__u32 limits = me->debt_kib / ((limit >> 10) ?: 1);
			if (limits >= STUCK_LIMITS || (limits >= STUCK_LIMITS_CROWDED && crowded(cfg))) {
				me->mode = STUCK;
				count(ACCEL_STAT_STUCK, 1);
			}
			count(ACCEL_STAT_PASSED, 1);
			count(ACCEL_STAT_PASSED_BYTES, size);
			return SK_PASS;
		}
		me->mode = REDIRECT;
		count(ACCEL_STAT_RESUMES, 1);
	} else if (queue_cost(queued, size) > limit || tcp_memory_short(psk, size)) {
		/* Redirect -> TCP keeps byte order: the peer's reader takes its redirect queue before
		 * its TCP receive queue (tcp_bpf_recvmsg). */
		me->mode = PAUSED;
		me->paused_bytes = size;
		me->paused_at = bpf_ktime_get_ns();
		me->debt_kib += (size + 1023) >> 10;
		count(ACCEL_STAT_PAUSES, 1);
		count(ACCEL_STAT_PASSED, 1);
		count(ACCEL_STAT_PASSED_BYTES, size);
		return SK_PASS;
	}
	if (cfg && cfg->small_write && size < cfg->small_write) {
		/* A small send to a reader that has not taken the previous ones yet: a stream of small
		 * writes, which TCP coalesces and the redirect cannot (one message, one wake-up each).
		 * A request to a waiting reader (nothing unread) stays redirected. */
		if (queued > 0) {
			/* Or sooner, once the unread small sends would fill a quarter of the reader's
			 * receive buffer: TCP's window does not count redirected bytes that came after
			 * it was advertised, so TCP bytes arriving on top of them find the receive
			 * memory over SO_RCVBUF, and TCP then grows the buffer to what it holds
			 * (tcp_prune_queue -> tcp_clamp_window) for good: 16 KiB writes left their
			 * readers with 2.7 MB buffers instead of 1 MB, 5% slower for the rest of the
			 * connection (more bytes in flight than the caches hold). */
			if (++me->small_streak >= cfg->small_streak ||
			    queued + size > (__u32)BPF_CORE_READ(psk, sk_rcvbuf) / 4) {
				me->mode = DEMOTED_SMALL;
				count(ACCEL_STAT_DEMOTED_SMALL, 1);
				count(ACCEL_STAT_PASSED, 1);
				count(ACCEL_STAT_PASSED_BYTES, size);
				return SK_PASS;
			}
		} else {
			me->small_streak = 0;
		}
	} else {
		me->small_streak = 0;
	}
	if (bpf_msg_redirect_hash(msg, &accel_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		__u32 kib = (size + 1023) >> 10;
		me->debt_kib = me->debt_kib > kib ? me->debt_kib - kib : 0;
		count(ACCEL_STAT_MESSAGES, 1);
		count(ACCEL_STAT_BYTES, size);
	} else {
		/* The peer left the map (closing): this and every later send take the TCP path. */
		me->mode = PEER_GONE;
		count(ACCEL_STAT_FALLBACKS, 1);
	}
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
