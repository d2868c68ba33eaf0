//! The report of the concurrency axis (issue 11): turns scripts/bench-pairs.sh's results
//! (`contender<TAB>pairs<TAB>metric<TAB>value<TAB>round`) into a section of BENCHMARKS.md, one
//! per CPU count (a 2-CPU run leaves a 16-CPU run's section alone), and the chart's data. It
//! measures nothing.
use clap::Args;
use std::{collections::BTreeMap, fmt::Write as _, fs, io, path::PathBuf};

#[derive(Args)]
pub struct PairsReportArgs {
    /// pairs.tsv of scripts/bench-pairs.sh.
    #[arg(long)]
    results: PathBuf,
    /// pairs-meta.env of scripts/bench-pairs.sh.
    #[arg(long)]
    meta: PathBuf,
    /// BENCHMARKS.md: its section for this CPU count is replaced (or added before the
    /// hand-written part); everything else is kept.
    #[arg(long)]
    out: PathBuf,
    /// gnuplot data for scripts/bench-pairs.gp.
    #[arg(long)]
    chart_data: PathBuf,
    /// The chart's file name, as BENCHMARKS.md links it.
    #[arg(long)]
    chart: String,
}

/// Contenders in display order: (key, column heading).
const CONTENDERS: &[(&str, &str)] = &[
    ("direct", "direct loopback"),
    ("relay-kernel", "relay, kernel"),
    ("relay-kernel-after0", "relay, kernel `--kernel-after 0`"),
    ("relay-userspace", "relay, userspace"),
    ("proxy-kernel", "proxy, kernel"),
    ("proxy-kernel-after0", "proxy, kernel `--kernel-after 0`"),
    ("proxy-userspace", "proxy, userspace"),
    ("haproxy-threads", "HAProxy, threads = CPUs, splice"),
];

/// Section markers; report.rs keeps everything between the first begin and its own marker.
pub const BEGIN: &str = "<!-- bench-pairs";

fn markers(cpus: &str) -> (String, String) {
    (format!("{BEGIN} {cpus} CPUs: begin -->"), format!("{BEGIN} {cpus} CPUs: end -->"))
}

/// (contender, pairs, metric) -> [(round, value)].
type Results = BTreeMap<(String, u64, String), Vec<(u32, f64)>>;

struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Stat { median, min: v[0], max: v[n - 1], n })
}

fn values(r: &Results, c: &str, n: u64, m: &str) -> Vec<f64> {
    r.get(&(c.to_string(), n, m.to_string())).map(|v| v.iter().map(|(_, x)| *x).collect()).unwrap_or_default()
}

fn cell(s: Option<Stat>, prec: usize, unit: &str) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.p$}{unit} ({:.p$}-{:.p$})", s.median, s.min, s.max, p = prec),
        Some(s) => format!("{:.p$}{unit}", s.median, p = prec),
        None => "-".into(),
    }
}

/// a/b for each round both were measured in: ratios within one run, the interleaving's point.
fn round_ratios(r: &Results, a: &str, b: &str, n: u64, m: &str) -> Vec<f64> {
    let key = |c: &str| (c.to_string(), n, m.to_string());
    let (Some(va), Some(vb)) = (r.get(&key(a)), r.get(&key(b))) else { return vec![] };
    va.iter()
        .filter_map(|(round, x)| vb.iter().find(|(rb, _)| rb == round).map(|(_, y)| (*x, *y)))
        .filter(|(_, y)| y.abs() > 1e-12)
        .map(|(x, y)| x / y)
        .collect()
}

/// The end-of-pair path names (slugs of the log line's words), shortened for the table.
fn path_name(slug: &str) -> String {
    match slug {
        "kernel" => "kernel".into(),
        "kernel-after-a-userspace-start" => "kernel, after a splice(2) start".into(),
        "userspace" => "splice(2)".into(),
        "userspace-below-kernel-after" => "**splice(2), below --kernel-after**".into(),
        "userspace-before-joining-the-kernel" => "**splice(2), before joining**".into(),
        s if s.starts_with("userspace-a-client-half-closed") => {
            "**splice(2), half-closed before it could join**".into()
        }
        s if s.starts_with("userspace") => format!("**splice(2): {s}**"),
        s => s.to_string(),
    }
}

pub fn report(a: PairsReportArgs) -> io::Result<()> {
    let mut r: Results = BTreeMap::new();
    for line in fs::read_to_string(&a.results)?.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if let [c, n, m, v, round] = f[..] {
            if let (Ok(n), Ok(v), Ok(round)) = (n.parse(), v.parse(), round.parse()) {
                r.entry((c.into(), n, m.into())).or_default().push((round, v));
            }
        }
    }
    if r.is_empty() {
        return Err(io::Error::other(format!("{}: no results", a.results.display())));
    }
    let meta: BTreeMap<String, String> = fs::read_to_string(&a.meta)?
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let m = |k: &str| meta.get(k).cloned().unwrap_or_else(|| "?".into());
    let mut ns: Vec<u64> = r.keys().map(|(_, n, _)| *n).collect();
    ns.sort_unstable();
    ns.dedup();
    let present: Vec<_> = CONTENDERS.iter().filter(|(c, _)| r.keys().any(|(rc, _, _)| rc == c)).collect();
    let cpus = m("cpus");
    let (begin, end) = markers(&cpus);

    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "{begin}\n");
    let _ = writeln!(w, "## Concurrent bulk pairs, {cpus} CPUs\n");
    let _ = writeln!(
        w,
        "Generated by `scripts/bench-pairs.sh --pairs {} --rounds {}` on {} (git {}). Machine: {} x {}, {} RAM, \
         Linux {}, `kernel.sched_autogroup_enabled={}`; HAProxy {} with `nbthread {cpus}` and forced splice \
         (`option splice-request`/`splice-response`). Load average (1/5/15 min) before -> after: {}. Waiting for a quiet moment: {}.\n",
        m("pairs"),
        m("rounds"),
        m("date"),
        m("git"),
        cpus,
        m("cpu_model"),
        m("mem"),
        m("kernel"),
        m("autogroup"),
        m("haproxy"),
        m("load"),
        meta.get("settle").map(String::as_str).unwrap_or("off"),
    );
    if let Some(note) = meta.get("note").filter(|n| !n.is_empty()) {
        let _ = writeln!(w, "> **Note:** {note}\n");
    }
    let _ = writeln!(
        w,
        "N concurrent one-way bulk pairs, all opened before the clock starts and started together; {} in all \
         (each pair sends 1/N of it), every pair's bytes sha256-checked after the clock stops. Throughput: all \
         bytes over the time until the last pair's last byte. CPU: busy CPU-seconds of the whole machine \
         (/proc/stat) per GiB moved, client and server included, as in the table above. Medians of {} rounds, \
         min-max in brackets; contenders interleaved within each round. skrelay runs with default flags except \
         those named, with `RUST_LOG=warn`, and `--metrics`, from which each pair's path is read.\n",
        m("bytes_h"),
        m("rounds"),
    );
    let _ = writeln!(w, "![concurrent pairs: throughput and CPU per GiB]({})\n", a.chart);
    let others = stat(
        r.iter().filter(|((_, _, m), _)| m == "others_cpu_s").flat_map(|(_, v)| v.iter().map(|(_, x)| *x)).collect(),
    );
    if let Some(o) = &others {
        let _ = writeln!(
            w,
            "Other processes on the machine (not the bench, not the daemon measured, not kernel threads) used \
             {:.2} CPU-seconds per measurement (median; {:.2}-{:.2}). The last CPU table takes their time out \
             of the machine's: on a quiet machine the two tables agree, on a shared one only the last is the \
             contenders' own cost.\n",
            o.median, o.min, o.max
        );
    }
    for (metric, title, prec, unit) in [
        ("gbps", "Aggregate Gbit/s", 1, ""),
        ("cpu_s_per_gib", "CPU-seconds per GiB, whole machine", 2, ""),
        ("own_cpu_s_per_gib", "CPU-seconds per GiB, whole machine less other processes", 2, ""),
    ] {
        let _ = writeln!(w, "### {title}\n");
        let _ = write!(w, "| N pairs |");
        for (_, name) in &present {
            let _ = write!(w, " {name} |");
        }
        let _ = write!(w, "\n|---|");
        for _ in &present {
            let _ = write!(w, "---|");
        }
        let _ = writeln!(w);
        for &n in &ns {
            let _ = write!(w, "| {n} |");
            for (c, _) in &present {
                let _ = write!(w, " {} |", cell(stat(values(&r, c, n, metric)), prec, unit));
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(w);
    }

    // Ratios to HAProxy, per round.
    let ours = ["proxy-kernel", "proxy-kernel-after0", "proxy-userspace"];
    let have = |c: &str| present.iter().any(|(k, _)| *k == c);
    if have("haproxy-threads") && ours.iter().any(|c| have(c)) {
        let _ = writeln!(w, "### skrelay proxy / HAProxy\n");
        let _ = writeln!(
            w,
            "Ratios taken within each round (the contenders ran back to back), median and range over the rounds.\n"
        );
        let _ = write!(w, "| N pairs |");
        for c in ours.iter().filter(|c| have(c)) {
            let name = CONTENDERS.iter().find(|(k, _)| k == c).map(|(_, n)| *n).unwrap_or(c);
            let _ = write!(w, " {name}: throughput | CPU/GiB | CPU/GiB less others |");
        }
        let _ = write!(w, "\n|---|");
        for _ in ours.iter().filter(|c| have(c)) {
            let _ = write!(w, "---|---|---|");
        }
        let _ = writeln!(w);
        for &n in &ns {
            let _ = write!(w, "| {n} |");
            for c in ours.iter().filter(|c| have(c)) {
                let _ = write!(
                    w,
                    " {} | {} | {} |",
                    cell(stat(round_ratios(&r, c, "haproxy-threads", n, "gbps")), 2, "x"),
                    cell(stat(round_ratios(&r, c, "haproxy-threads", n, "cpu_s_per_gib")), 2, "x"),
                    cell(stat(round_ratios(&r, c, "haproxy-threads", n, "own_cpu_s_per_gib")), 2, "x"),
                );
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(w);
        if ns.contains(&16) {
            let _ = writeln!(w, "Issue 11's targets at 16 pairs (verdict on the median of the per-round ratios):\n");
            let _ = writeln!(w, "| target | measured | result |");
            let _ = writeln!(w, "|---|---|---|");
            let mut target = |what: &str, c: &str, m: &str, pass: &dyn Fn(f64) -> bool| {
                let s = stat(round_ratios(&r, c, "haproxy-threads", 16, m));
                let verdict = match &s {
                    Some(s) if pass(s.median) => "pass",
                    Some(_) => "**miss**",
                    None => "not measured",
                };
                let _ = writeln!(w, "| {what} | {} | {verdict} |", cell(s, 2, "x"));
            };
            for (c, who) in [
                ("proxy-kernel", "kernel proxy (default flags)"),
                ("proxy-kernel-after0", "kernel proxy `--kernel-after 0`"),
            ] {
                target(&format!("{who} throughput >= 1.3x HAProxy"), c, "gbps", &|x| x >= 1.3);
                target(&format!("{who} CPU/GiB <= 0.8x HAProxy (whole machine)"), c, "cpu_s_per_gib", &|x| x <= 0.8);
                target(
                    &format!("{who} CPU/GiB <= 0.8x HAProxy (less other processes)"),
                    c,
                    "own_cpu_s_per_gib",
                    &|x| x <= 0.8,
                );
            }
            target("userspace proxy throughput >= 1.0x HAProxy", "proxy-userspace", "gbps", &|x| x >= 1.0);
            let _ = writeln!(w);
        }
    }

    // Paths.
    let mut paths: BTreeMap<(&str, u64), Vec<(String, f64)>> = BTreeMap::new();
    for ((c, n, metric), v) in &r {
        if let Some(slug) = metric.strip_prefix("path:") {
            if let Some((key, _)) = CONTENDERS.iter().find(|(k, _)| k == c) {
                paths.entry((key, *n)).or_default().push((path_name(slug), v.iter().map(|(_, x)| x).sum()));
            }
        }
    }
    if !paths.is_empty() {
        let _ = writeln!(w, "### Which path carried each pair\n");
        let _ = writeln!(
            w,
            "From skrelay's `skrelay_pair_paths_total{{path}}` (the end-of-pair log line's words), all rounds \
             together; bold: pairs a kernel datapath left on splice(2).\n"
        );
        let _ = write!(w, "| contender |");
        for &n in &ns {
            let _ = write!(w, " {n} pairs |");
        }
        let _ = write!(w, "\n|---|");
        for _ in &ns {
            let _ = write!(w, "---|");
        }
        let _ = writeln!(w);
        for (c, name) in CONTENDERS {
            if !ns.iter().any(|&n| paths.contains_key(&(*c, n))) {
                continue;
            }
            let _ = write!(w, "| {name} |");
            for &n in &ns {
                let list: Vec<String> = paths
                    .get(&(*c, n))
                    .map(|v| v.iter().map(|(p, k)| format!("{p}: {k:.0}")).collect())
                    .unwrap_or_default();
                let _ = write!(w, " {} |", if list.is_empty() { "-".into() } else { list.join(", ") });
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "{end}");

    // Into BENCHMARKS.md: replace this CPU count's section, or add it before the hand-written part.
    let old = fs::read_to_string(&a.out).unwrap_or_default();
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], md.trim_end(), &old[e + end.len()..]),
        _ => match old.find(crate::report::MARKER) {
            Some(at) => format!("{}{md}\n{}", &old[..at], &old[at..]),
            None => format!("{old}{}{md}", if old.is_empty() || old.ends_with("\n\n") { "" } else { "\n" }),
        },
    };
    fs::write(&a.out, new)?;

    // Chart data: index 0 throughput, index 1 CPU per GiB, index 2 the same less other processes; rows `N` then median min max of each
    // contender in CONTENDERS order (NaN where not measured).
    let mut dat = String::new();
    for metric in ["gbps", "cpu_s_per_gib", "own_cpu_s_per_gib"] {
        let names: Vec<&str> = CONTENDERS.iter().map(|(k, _)| *k).collect();
        let _ = writeln!(dat, "# {metric}: N, then median min max of {}", names.join(" "));
        for &n in &ns {
            let _ = write!(dat, "{n}");
            for (c, _) in CONTENDERS {
                match stat(values(&r, c, n, metric)) {
                    Some(s) => {
                        let _ = write!(dat, " {} {} {}", s.median, s.min, s.max);
                    }
                    None => dat.push_str(" NaN NaN NaN"),
                }
            }
            dat.push('\n');
        }
        dat.push_str("\n\n");
    }
    fs::write(&a.chart_data, dat)?;
    Ok(())
}
