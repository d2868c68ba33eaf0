//! skrelay: an in-kernel TCP relay and splicing proxy. The binary's commands are thin wrappers
//! around the modules here.
pub mod abi;
pub mod accel;
pub mod bpf;
pub mod bpffs;
pub mod cli;
pub mod datapath;
pub mod error;
pub mod log_filter;
pub mod log_sink;
pub mod metrics;
pub mod pairing;
pub mod proxy_cmd;
pub mod relay_cmd;
pub mod running;
pub mod server;
pub mod status;
pub mod steer;
pub mod sys;
pub mod systemd;
pub mod takeover;
pub mod upstream;
