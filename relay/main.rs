//! The `skrelay` binary: parses the command line, dispatches, and prints what the command
//! returns; all work is in the library, which never prints or exits.
use skrelay::cli::{AccelCommand, Cli, Command, SteerCommand};

/// An allocation that fails ends skrelay with a sentence and exit 2, not an abort.
#[global_allocator]
static ALLOCATOR: skrelay::sys::ExitWhenOutOfMemory = skrelay::sys::ExitWhenOutOfMemory;

fn main() {
    let cli = match Cli::try_parse_command_line() {
        Ok(cli) => cli,
        Err(e) => match skrelay::cli::usage_error(&e, &std::env::args().collect::<Vec<_>>()) {
            Some(sentence) => {
                say(&sentence);
                std::process::exit(2);
            }
            None if e.use_stderr() => e.exit(),
            // `--help` and `--version`: clap's own exit would say 0 had the text not been written.
            None => {
                use std::io::Write;
                match e.print().and_then(|()| std::io::stdout().flush()) {
                    Ok(()) => std::process::exit(0),
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
                    Err(err) => {
                        let what = if e.kind() == clap::error::ErrorKind::DisplayVersion { "version" } else { "help" };
                        say(&format!("the {what} could not be written to standard output: {err}"));
                        std::process::exit(2);
                    }
                }
            }
        },
    };
    // RUST_LOG is checked before env_logger sees it (`log_filter`); what was dropped is said.
    let (filters, ignored) = skrelay::log_filter::filters(&std::env::var("RUST_LOG").unwrap_or_default());
    let mut log = env_logger::Builder::new();
    log.parse_filters(&filters);
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        log.parse_write_style(&style);
    }
    log.format_target(false).format_timestamp_millis();
    // `RUST_LOG=debug` keeps the BPF loader's internals at info (`log_filter::quieted`).
    for loader in skrelay::log_filter::quieted(&filters) {
        log.filter_module(loader, log::LevelFilter::Info);
    }
    // The commands that serve clients never wait for their log's reader (`log_sink`).
    let serves = matches!(cli.command, Command::Relay(_) | Command::Proxy(_));
    if serves {
        use std::io::IsTerminal;
        if std::env::var_os("RUST_LOG_STYLE").is_none() && std::io::stderr().is_terminal() {
            log.write_style(env_logger::WriteStyle::Always);
        }
        log.target(env_logger::Target::Pipe(skrelay::log_sink::start()));
    }
    log.init();
    // Straight to standard error: at any level `error,skrelay=dbug` or a regex (`/listening`)
    // could filter out the line that says the typo was dropped (re-check passes).
    if !ignored.is_empty() {
        say(&format!(
            "RUST_LOG: ignored `{}` (give a level: off, error, warn, info, debug or trace, or MODULE=LEVEL for \
             skrelay or aya, and at most one /REGEX)",
            ignored.join("`, `")
        ));
    }
    // The commands that only report pinned state: short of descriptors, what they could not open
    // read as state that is not there. (Those that change it fail with the error, and leave
    // nothing half done; relay and proxy check their own descriptors.)
    let reads_state = match &cli.command {
        Command::Accel(AccelCommand::Status { .. }) => Some("accel status"),
        Command::Steer(SteerCommand::List(_)) => Some("steer list"),
        Command::Status(_) => Some("status"),
        Command::Metrics(_) => Some("metrics"),
        _ => None,
    };
    if let Some(Err(e)) = reads_state.map(skrelay::relay_cmd::command_descriptors) {
        say(&e.to_string());
        std::process::exit(e.exit_code());
    }
    let result = match cli.command {
        Command::Relay(args) => skrelay::relay_cmd::run(args).map(|()| String::new()),
        Command::Proxy(args) => skrelay::proxy_cmd::run(args).map(|()| String::new()),
        // `accel run` ends with the exit status of the command it ran.
        Command::Accel(AccelCommand::Run { cgroup, policy, command }) => {
            skrelay::accel::run(cgroup.as_deref(), &policy, &command).map(|code| std::process::exit(code))
        }
        Command::Accel(cmd) => skrelay::accel::command(cmd),
        Command::Steer(cmd) => skrelay::steer::command(cmd),
        Command::Status(args) => skrelay::status::run(args),
        Command::Metrics(args) => skrelay::metrics::run(args).map(|()| String::new()),
        Command::Probe => skrelay::datapath::probe(),
    };
    if serves {
        skrelay::log_sink::drain(LAST_LOG_WAIT);
    }
    match result {
        Ok(stdout) => write_stdout(&stdout),
        Err(e) => {
            say(&e.to_string());
            std::process::exit(e.exit_code());
        }
    }
}

/// Longest a relay or a proxy waits at exit for its queued log lines to be written.
const LAST_LOG_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Prints a command's report. A reader that went away (`steer list | head -1`) ends it quietly, as
/// the command itself is done; any other failure to write (a full disk) is said, with exit 2, and
/// never a panic, which `print!` would be.
fn write_stdout(report: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(report.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            say(&format!("the command completed, but its report could not be written to standard output: {e}"));
            std::process::exit(2);
        }
    }
}

/// One sentence on standard error; where even that cannot be written, the exit status says it.
fn say(sentence: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skrelay: {sentence}");
}
