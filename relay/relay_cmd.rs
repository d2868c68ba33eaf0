//! `skrelay relay`: pair clients of one listener and splice each pair.
use crate::{
    cli::{PairBy, RelayArgs},
    datapath,
    error::Error,
    server::{self, Partnering, Server, ServerConfig},
    steer::{self, Funnel},
};

pub fn run(args: RelayArgs) -> Result<(), Error> {
    let config = ServerConfig {
        listen: args.listen,
        partnering: Partnering::Clients(args.pair),
        max_pending: args.max_pending as usize,
        pair_timeout: args.pair_timeout,
        drain_timeout: args.common.drain_timeout,
    };
    let datapath = datapath::open(args.common.datapath, args.common.kernel_after, args.common.kernel_limits())?;
    let listener = server::listen(config.listen)?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    // Attached before the first log line so "listening" means every port is served; dropped
    // (detached) when run() returns, and by the kernel if the process dies.
    let _funnel = match &args.ports.ports {
        Some(ports) => Some(funnel(&listener, addr, ports)?),
        None => None,
    };
    let pairing = match args.pair {
        PairBy::Order => "pairing clients in arrival order",
        PairBy::Token => "pairing clients by their token line",
    };
    log::info!("listening on {addr}: {pairing}, {} datapath", datapath.name());
    Server::new(listener, datapath, config)?.run()
}

/// `--ports`: steers the listed ports to the listener, warning about sockets it shadows.
pub fn funnel(
    listener: &impl std::os::fd::AsFd,
    addr: std::net::SocketAddr,
    ports: &steer::PortList,
) -> Result<Funnel, Error> {
    for other in steer::funnel::shadowed(addr, ports) {
        log::warn!(
            "port {}: {other} is served by another socket; skrelay takes its connections while it runs",
            other.port()
        );
    }
    let funnel = Funnel::attach(listener, addr, ports)?;
    log::info!("--ports: {} ports ({ports}) steered to {addr} with BPF sk_lookup", funnel.ports());
    Ok(funnel)
}
