//! The `skrelay` binary: parses the command line, dispatches, and prints what the command
//! returns; all work is in the library, which never prints or exits.
use skrelay::cli::{AccelCommand, Cli, Command};

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
    let mut log = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    log.format_target(false).format_timestamp_millis();
    // `RUST_LOG=debug` asks for skrelay's own lines (one per connection); the BPF loader's
    // internals (about 50 lines a loop: feature detection, BTF fix-ups, relocations) drowned them
    // (a helper's README pass). They stay at info unless RUST_LOG names the loader (`aya=debug`).
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    if loader_quieted(&spec) {
        for loader in ["aya", "aya_obj"] {
            log.filter_module(loader, log::LevelFilter::Info);
        }
    }
    // An empty RUST_LOG (`Environment=RUST_LOG=` in a unit) or a misspelled level (`inof`, taken
    // for a module's name) turned every line off, warnings included (a helper's pass): either
    // logs at the default, info, and a word it names no level nor module of is said at start.
    let unknown = unknown_log_words(&spec);
    let blank = std::env::var_os("RUST_LOG").is_some() && spec.trim().is_empty();
    if blank || !unknown.is_empty() {
        log.parse_filters("info");
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
    if !unknown.is_empty() {
        log::warn!(
            "RUST_LOG: `{}` names no level (off, error, warn, info, debug, trace) and no part of skrelay \
             (skrelay, aya): logging at info",
            unknown.join("`, `")
        );
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

/// Whether RUST_LOG (`spec`) sets every module to debug or trace without naming the BPF loader
/// (aya): then the loader's lines are kept at info.
fn loader_quieted(spec: &str) -> bool {
    let filters = spec.split('/').next().unwrap_or_default();
    !filters.contains("aya")
        && filters.split(',').any(|d| {
            let d = d.trim();
            d.eq_ignore_ascii_case("debug") || d.eq_ignore_ascii_case("trace")
        })
}

/// The words of RUST_LOG (`spec`) given alone (not `module=level`) that are neither a level nor
/// a module of this program (skrelay, or its BPF loader aya): env_logger takes such a word for a
/// module to log in full, so a misspelled level silenced every line.
fn unknown_log_words(spec: &str) -> Vec<String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let filters = spec.split('/').next().unwrap_or_default();
    filters
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('='))
        .filter(|d| !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)))
        .filter(|d| !matches!(d.split("::").next(), Some("skrelay" | "aya" | "aya_obj")))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn misspelled_log_levels_are_found() {
        use super::unknown_log_words;
        assert_eq!(unknown_log_words("inof"), ["inof"]);
        assert_eq!(unknown_log_words("debug,wran"), ["wran"]);
        assert!(unknown_log_words("").is_empty() && unknown_log_words("INFO").is_empty());
        assert!(unknown_log_words("skrelay,aya::bpf=debug").is_empty());
        assert!(unknown_log_words("skrelay::server=trace,warn").is_empty());
        assert!(unknown_log_words("aya_obj,info/pair").is_empty());
    }

    #[test]
    fn the_loader_is_quieted_only_under_a_global_debug_that_does_not_name_it() {
        use super::loader_quieted;
        assert!(loader_quieted("debug") && loader_quieted("TRACE") && loader_quieted("warn,debug"));
        assert!(!loader_quieted("debug,aya=debug") && !loader_quieted("aya_obj=trace,debug"));
        assert!(!loader_quieted("") && !loader_quieted("info") && !loader_quieted("skrelay=debug"));
    }
}
