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
    // RUST_LOG is checked before env_logger sees it: an empty value (a unit's
    // `Environment=RUST_LOG=`), a misspelled level (`inof`, taken for a module's name), a module
    // not ours (`foo=debug`) or a bad level (`skrelay=dbug`) turned every line off, warnings
    // included, and `=` turned every line on (helpers' passes). Only directives for skrelay or its
    // loader are kept; the level is info unless one is given; what was dropped is said at start.
    let (filters, ignored) = log_filters(&std::env::var("RUST_LOG").unwrap_or_default());
    let mut log = env_logger::Builder::new();
    log.parse_filters(&filters);
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        log.parse_write_style(&style);
    }
    log.format_target(false).format_timestamp_millis();
    // `RUST_LOG=debug` asks for skrelay's own lines (one per connection); the BPF loader's
    // internals (about 50 lines a loop: feature detection, BTF fix-ups, relocations) drowned them
    // (a helper's README pass). They stay at info unless RUST_LOG names the loader (`aya=debug`).
    // Each loader module the user did not name itself (`aya::programs=info` named neither
    // whole, and brought back the flood: a re-check pass).
    if loader_quieted(&filters) {
        for loader in ["aya", "aya_obj"] {
            // env_logger matches by prefix: `aya` names aya_obj too.
            let named = filters
                .split('/')
                .next()
                .unwrap_or_default()
                .split(',')
                .filter_map(|d| d.split('=').next())
                .any(|module| matches!(module, "aya" | "aya_obj") && loader.starts_with(module));
            if !named {
                log.filter_module(loader, log::LevelFilter::Info);
            }
        }
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

/// Whether the filters set every module to debug or trace: then the BPF loader's lines are kept
/// at info, except in a module the user named (`main`).
fn loader_quieted(filters: &str) -> bool {
    filters.split('/').next().unwrap_or_default().split(',').any(|d| {
        let d = d.trim();
        d.eq_ignore_ascii_case("debug") || d.eq_ignore_ascii_case("trace")
    })
}

/// What env_logger is given for RUST_LOG (`spec`), and the directives dropped from it: a
/// directive is kept if it is a level, a module of this program (skrelay, or its BPF loader aya)
/// or MODULE=LEVEL for one; `info` leads unless a level for every module is given.
fn log_filters(spec: &str) -> (String, Vec<String>) {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |w: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(w));
    let ours = |m: &str| matches!(m.split("::").next(), Some("skrelay" | "aya" | "aya_obj"));
    let (directives, regex) = match spec.split_once('/') {
        Some((d, r)) => (d, Some(r)),
        None => (spec, None),
    };
    let (mut kept, mut dropped, mut global) = (Vec::new(), Vec::new(), false);
    for d in directives.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // Kept as env_logger reads it: `skrelay = debug` named a module "skrelay " (a re-check
        // pass), so the spaces go.
        let kept_as = match d.split_once('=') {
            Some((module, level)) => {
                (ours(module.trim()) && is_level(level.trim())).then(|| format!("{}={}", module.trim(), level.trim()))
            }
            None if is_level(d) => {
                global = true;
                Some(d.to_string())
            }
            None => ours(d).then(|| d.to_string()),
        };
        match kept_as {
            Some(k) => kept.push(k),
            None => dropped.push(d.to_string()),
        }
    }
    if !global {
        kept.insert(0, "info".into());
    }
    let mut filters = kept.join(",");
    match regex {
        // env_logger refuses a second '/' and then logs errors alone (a re-check pass).
        Some(regex) if regex.contains('/') => dropped.push(format!("/{regex}")),
        Some(regex) => filters = format!("{filters}/{regex}"),
        None => {}
    }
    (filters, dropped)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rust_log_keeps_what_names_skrelay_and_a_level() {
        use super::log_filters;
        let f = |spec: &str| log_filters(spec);
        assert_eq!(f(""), ("info".into(), vec![]));
        assert_eq!(f(",, , "), ("info".into(), vec![]));
        assert_eq!(f("inof"), ("info".into(), vec!["inof".into()]));
        assert_eq!(f("debug,wran"), ("debug".into(), vec!["wran".into()]));
        assert_eq!(f("INFO"), ("INFO".into(), vec![]));
        assert_eq!(f(" warn "), ("warn".into(), vec![]));
        assert_eq!(f("="), ("info".into(), vec!["=".into()]));
        assert_eq!(f("warn,="), ("warn".into(), vec!["=".into()]));
        assert_eq!(f("foo=debug"), ("info".into(), vec!["foo=debug".into()]));
        assert_eq!(f("skrelay=dbug"), ("info".into(), vec!["skrelay=dbug".into()]));
        assert_eq!(f("skrelay::server=trace"), ("info,skrelay::server=trace".into(), vec![]));
        assert_eq!(f("aya=trace,debug"), ("aya=trace,debug".into(), vec![]));
        assert_eq!(f("skrelay = debug"), ("info,skrelay=debug".into(), vec![]));
        assert_eq!(f("skrelay,warn/pair"), ("skrelay,warn/pair".into(), vec![]));
        assert_eq!(f("info/a/b"), ("info".into(), vec!["/a/b".into()]));
    }

    #[test]
    fn the_loader_is_quieted_only_under_a_global_debug_that_does_not_name_it() {
        use super::loader_quieted;
        assert!(loader_quieted("debug") && loader_quieted("TRACE") && loader_quieted("warn,debug"));
        assert!(!loader_quieted("") && !loader_quieted("info") && !loader_quieted("skrelay=debug"));
    }
}
