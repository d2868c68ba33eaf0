//! The `skrelay` binary: parses the command line and dispatches; all work is in the library.
use clap::Parser;
use skrelay::cli::{AccelCommand, Cli, Command, SteerCommand};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    let result = match cli.command {
        Command::Relay(args) => skrelay::relay_cmd::run(args),
        Command::Accel(cmd) => accel(cmd),
        Command::Steer(SteerCommand::Add(args)) => skrelay::steer::add(args),
        Command::Steer(SteerCommand::List(args)) => skrelay::steer::list(args),
        Command::Steer(SteerCommand::Remove(args)) => skrelay::steer::remove(args),
        Command::Steer(SteerCommand::Reset) => skrelay::steer::reset(),
        Command::Status(args) => skrelay::status::run(args),
        Command::Probe => skrelay::datapath::kernel::KernelDatapath::load().map(|_| println!("kernel datapath: ok")),
    };
    if let Err(e) = result {
        eprintln!("skrelay: {e}");
        std::process::exit(e.exit_code());
    }
}

fn accel(cmd: AccelCommand) -> Result<(), skrelay::error::Error> {
    use skrelay::accel;
    match cmd {
        AccelCommand::On { cgroup, ports } => {
            let on = accel::on(&cgroup, &ports)?;
            println!("accel on: {} (state pinned at {})", on.cgroup, on.pins.display());
        }
        AccelCommand::Off { cgroup, wait, force } => {
            let off = accel::off(&cgroup, wait, force)?;
            if off.forced_sockets > 0 {
                println!("accel off: {} ({} open sockets detached by --force)", off.cgroup, off.forced_sockets);
            } else {
                println!("accel off: {}", off.cgroup);
            }
        }
        AccelCommand::Run { cgroup, command } => std::process::exit(accel::run(cgroup.as_deref(), &command)?),
        AccelCommand::Status { json } => {
            let reports = accel::report()?;
            if reports.is_empty() && !json {
                println!("accel: no cgroup is accelerated");
            }
            for r in reports {
                println!("{}", if json { r.to_json() } else { r.to_string() });
            }
        }
    }
    Ok(())
}
