//! The `skrelay` binary: parses the command line and dispatches; all work is in the library.
use clap::Parser;
use skrelay::cli::{Cli, Command, SteerCommand};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    let result = match cli.command {
        Command::Relay(args) => skrelay::relay_cmd::run(args),
        Command::Proxy(args) => skrelay::proxy_cmd::run(args),
        Command::Accel(cmd) => skrelay::accel::command(cmd),
        Command::Steer(SteerCommand::Add(args)) => skrelay::steer::add(args),
        Command::Steer(SteerCommand::List(args)) => skrelay::steer::list(args),
        Command::Steer(SteerCommand::Remove(args)) => skrelay::steer::remove(args),
        Command::Steer(SteerCommand::Reset) => skrelay::steer::reset(),
        Command::Status(args) => skrelay::status::run(args),
        Command::Metrics(args) => skrelay::metrics::run(args),
        Command::Probe => skrelay::datapath::kernel::KernelDatapath::load(0, Default::default())
            .map(|_| println!("kernel datapath: ok")),
    };
    if let Err(e) = result {
        eprintln!("skrelay: {e}");
        std::process::exit(e.exit_code());
    }
}
