//! RUST_LOG, checked before env_logger sees it. An empty value (a unit's
//! `Environment=RUST_LOG=`), a misspelled level (`inof`, which env_logger takes for a module's
//! name), a module not ours (`foo=debug`) or a bad level (`skrelay=dbug`) turned every line off,
//! warnings included, and `=` turned every line on (helpers' passes). Only directives for skrelay
//! or its BPF loader are kept; the level is info unless one is given; the caller says what was
//! dropped.

/// The BPF loader's modules (aya).
const LOADER: [&str; 2] = ["aya", "aya_obj"];

/// What env_logger is given for RUST_LOG (`spec`), and the directives dropped from it: a
/// directive is kept if it is a level, a module of this program (skrelay, or its BPF loader aya)
/// or MODULE=LEVEL for one; `info` leads unless a level for every module is given.
pub fn filters(spec: &str) -> (String, Vec<String>) {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |w: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(w));
    let ours = |m: &str| m.split("::").next().is_some_and(|m| m == "skrelay" || LOADER.contains(&m));
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

/// The loader's modules to keep at info under `filters` (from `filters`): `RUST_LOG=debug` asks
/// for skrelay's own lines (one per connection), and the loader's internals (about 50 lines a
/// loop: feature detection, BTF fix-ups, relocations) drowned them (a helper's README pass).
/// Each module the user named stays as asked (env_logger matches by prefix: `aya` names aya_obj
/// too; `aya::programs=info` names neither whole, and used to bring the flood back).
pub fn quieted(filters: &str) -> Vec<&'static str> {
    let directives = filters.split('/').next().unwrap_or_default();
    let global_debug = directives.split(',').any(|d| {
        let d = d.trim();
        d.eq_ignore_ascii_case("debug") || d.eq_ignore_ascii_case("trace")
    });
    if !global_debug {
        return vec![];
    }
    let named: Vec<&str> = directives.split(',').filter_map(|d| d.split('=').next()).collect();
    LOADER
        .into_iter()
        .filter(|loader| !named.iter().any(|module| LOADER.contains(module) && loader.starts_with(module)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_keeps_what_names_skrelay_and_a_level() {
        let f = |spec: &str| filters(spec);
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
    fn the_loader_is_quieted_under_a_global_debug_except_where_named() {
        assert_eq!(quieted("debug"), ["aya", "aya_obj"]);
        assert_eq!(quieted("TRACE"), ["aya", "aya_obj"]);
        assert_eq!(quieted("warn,debug"), ["aya", "aya_obj"]);
        assert_eq!(quieted("debug,aya=debug"), Vec::<&str>::new());
        assert_eq!(quieted("aya_obj=trace,debug"), ["aya"]);
        assert_eq!(quieted("debug,aya::programs=info"), ["aya", "aya_obj"]);
        assert!(quieted("info").is_empty() && quieted("info,skrelay=debug").is_empty());
    }
}
