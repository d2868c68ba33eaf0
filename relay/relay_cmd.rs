//! `skrelay relay`: pair clients of one listener and splice each pair.
use crate::{
    cli::RelayArgs,
    datapath,
    error::Error,
    server::{self, Server, ServerConfig},
};

pub fn run(args: RelayArgs) -> Result<(), Error> {
    let config = ServerConfig {
        listen: args.listen,
        pair_by: args.pair,
        max_pending: args.max_pending as usize,
        pair_timeout: args.pair_timeout,
        drain_timeout: args.common.drain_timeout,
    };
    let datapath = datapath::open(args.common.datapath)?;
    let listener = server::listen(config.listen)?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    log::info!("listening on {addr}: pairing by {:?}, {} datapath", config.pair_by, datapath.name());
    Server::new(listener, datapath, config)?.run()
}
