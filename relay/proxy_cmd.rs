//! `skrelay proxy`: splice each client to a fresh connection to an upstream.
use crate::{
    cli::ProxyArgs,
    datapath,
    error::Error,
    relay_cmd::funnel,
    server::{self, Partnering, Server, ServerConfig},
    upstream::Upstreams,
};

pub fn run(args: ProxyArgs) -> Result<(), Error> {
    let upstreams = Upstreams::resolve(&args.upstreams)?;
    let datapath = datapath::open(args.common.datapath, args.common.kernel_after)?;
    let listener = server::listen(args.listen)?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    let _funnel = match &args.ports.ports {
        Some(ports) => Some(funnel(&listener, addr, ports)?),
        None => None,
    };
    log::info!("listening on {addr}: proxying to {upstreams}, {} datapath", datapath.name());
    let config = ServerConfig {
        listen: args.listen,
        partnering: Partnering::Upstreams { upstreams, connect_timeout: args.connect_timeout },
        max_pending: usize::MAX,
        pair_timeout: args.connect_timeout,
        drain_timeout: args.common.drain_timeout,
    };
    Server::new(listener, datapath, config)?.run()
}
