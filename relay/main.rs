//! The `skrelay` binary: parses the command line and dispatches; all work is in the library.
use clap::Parser;
use skrelay::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    let result = match cli.command {
        Command::Relay(args) => skrelay::relay_cmd::run(args),
        Command::Probe => skrelay::datapath::kernel::KernelDatapath::load().map(|_| println!("kernel datapath: ok")),
    };
    if let Err(e) = result {
        eprintln!("skrelay: {e}");
        std::process::exit(e.exit_code());
    }
}
