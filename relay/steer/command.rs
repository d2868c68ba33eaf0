//! `skrelay steer ...`: each verb calls the domain function and renders what it returns as the
//! text for stdout; main.rs prints it.
use super::{add, list, remove, reset, BindingView, Listing, DETACHED_WARNING};
use crate::{cli::SteerCommand, error::Error};

pub fn command(cmd: SteerCommand) -> Result<String, Error> {
    match cmd {
        SteerCommand::Add(args) => Ok(render_add(&add(&args)?)),
        SteerCommand::List(args) if args.json => {
            let listing = list()?;
            // The JSON stays a list of this mount namespace's bindings; what steers from out of
            // its sight, and a detached link (nothing is steered: a steer pass found the JSON
            // alone could not tell), are said on stderr, as in the text form.
            for f in &listing.elsewhere {
                log::warn!("{}", super::elsewhere_warning(f).trim_start_matches("WARNING: "));
            }
            if listing.detached {
                log::warn!("{DETACHED_WARNING}");
            }
            let all: Vec<serde_json::Value> = listing.bindings.iter().map(BindingView::json).collect();
            Ok(format!("{}\n", serde_json::to_string_pretty(&all).expect("json")))
        }
        SteerCommand::List(_) => Ok(render_list(&list()?)),
        SteerCommand::Remove(args) => Ok(remove(&args)?.iter().map(|key| format!("removed binding {key}\n")).collect()),
        SteerCommand::Reset => {
            let r = reset()?;
            let mut out = match &r {
                super::Reset { removed: 0, .. } | super::Reset { dir: None, .. } => {
                    "no steering state in this network namespace: nothing to reset\n".to_string()
                }
                super::Reset { removed, dir: Some(dir), .. } => format!(
                    "removed every binding and the rest of the steering state, program and link included where pinned \
                     ({removed} pins under {})\n",
                    crate::sys::shown(dir).display()
                ),
            };
            match r.dead {
                0 => {}
                1 => out.push_str("removed the steering state of 1 network namespace that no longer exists\n"),
                n => out
                    .push_str(&format!("removed the steering state of {n} network namespaces that no longer exist\n")),
            }
            r.elsewhere.iter().for_each(|f| out.push_str(&format!("{}\n", super::elsewhere_warning(f))));
            Ok(out)
        }
    }
}

fn render_add(added: &super::Added) -> String {
    let t = &added.target;
    let to = format!("{} (pid {} {}, cookie {})", t.local, t.pid, t.comm, t.cookie);
    let mut out = String::new();
    if let Some(note) = &added.upgraded {
        out.push_str(&format!("{note}\n"));
    }
    for (key, was) in &added.bindings {
        match was {
            // The same socket (its cookie): re-adding changed nothing but the recorded pid.
            Some(was) if was.cookie == t.cookie => out.push_str(&format!("binding {key} already -> {to}: unchanged\n")),
            Some(was) => out.push_str(&format!(
                "replaced binding {key}: now -> {to}, was -> {} (pid {} {})\n",
                was.target, was.pid, was.comm
            )),
            None => out.push_str(&format!("bound {key} -> {to}\n")),
        }
    }
    if let Some(device) = &t.device {
        out.push_str(&format!(
            "note: the socket at {} is bound to interface {device}: only what arrives on {device} reaches it; \
             connections to these ports that arrive on another interface (lo included) are steered to it and \
             dropped, unanswered (narrow the binding with --addr to {device}'s addresses)\n",
            t.local
        ));
    }
    if !added.bypassed.is_empty() {
        const SHOWN: usize = 4;
        let mut at: Vec<String> = added.bypassed.iter().take(SHOWN).map(|a| a.to_string()).collect();
        if added.bypassed.len() > SHOWN {
            at.push(format!("{} more", added.bypassed.len() - SHOWN));
        }
        let udp = added.bindings.first().is_some_and(|(k, _)| k.proto == crate::cli::Proto::Udp);
        let (socket, its, process) = match (added.bypassed.len() == 1, udp) {
            (true, false) => ("a socket listens", "its", "process"),
            (true, true) => ("a socket is bound", "its", "process"),
            (false, false) => ("sockets listen", "their", "processes"),
            (false, true) => ("sockets are bound", "their", "processes"),
        };
        let (what, ss) = if udp { ("datagrams", "ss -lunp") } else { ("connections", "ss -ltnp") };
        let v4 = added.bindings.iter().any(|(k, _)| k.prefix.addr.is_ipv4());
        let dual = v4 && added.bypassed.iter().any(|a| a.is_ipv6() && a.ip().is_unspecified());
        out.push_str(&format!(
            "note: {socket} at {} (`{ss}` names {its} {process}): a binding takes precedence, so {its} {what} \
             to the steered ports now go to {}{}\n",
            at.join(", "),
            t.local,
            if dual { " (an IPv6 wildcard socket's IPv4 ones, unless it is IPv6-only)" } else { "" }
        ));
    }
    if t.reuse_port {
        out.push_str(&format!(
            "note: the socket at {} has SO_REUSEPORT: the kernel spreads the steered {} over every socket of its \
             group, as it does for its own port, not only this process's\n",
            t.local,
            match added.bindings.first().map(|(k, _)| k.proto) {
                Some(crate::cli::Proto::Udp) => "datagrams",
                _ => "connections",
            }
        ));
    }
    out
}

fn render_list(listing: &Listing) -> String {
    let views = &listing.bindings;
    let elsewhere: String = listing.elsewhere.iter().map(|f| format!("{}\n", super::elsewhere_warning(f))).collect();
    if views.is_empty() {
        let leftover = listing.leftover.as_ref().map_or(String::new(), |(dir, pins)| {
            format!(
                "; {} left at {} by an interrupted command steer nothing (`skrelay steer reset` or the next `skrelay \
                 steer add` removes them)",
                super::plural(*pins, "pin"),
                crate::sys::shown(dir).display()
            )
        });
        return format!("no steering bindings in this network namespace{leftover}\n{elsewhere}");
    }
    let mut rows =
        vec![["PROTO", "PREFIX", "PORTS", "TARGET", "PROCESS", "COOKIE", "HITS", "REFUSED"].map(String::from)];
    for b in views {
        let key = b.key();
        let process = match b.process_running {
            true => format!("{}/{}", b.record.pid, b.record.comm),
            // Out of sight is not gone (a re-check pass saw a live target called exited).
            false if crate::bpffs::in_pid_namespace_of_its_own() => {
                format!("{}/{} (not visible from this pid namespace)", b.record.pid, b.record.comm)
            }
            false => format!("{}/{} (exited)", b.record.pid, b.record.comm),
        };
        let target = match (b.alive, b.listening) {
            (false, _) => format!("{} (gone)", b.record.target),
            (true, false) if key.proto == crate::cli::Proto::Udp => format!("{} (connected)", b.record.target),
            (true, false) => format!("{} (not listening)", b.record.target),
            (true, true) => b.record.target.to_string(),
        };
        rows.push([
            key.proto.name().to_string(),
            key.prefix.to_string(),
            key.ports.to_string(),
            target,
            process,
            b.record.cookie.to_string(),
            b.hits.to_string(),
            b.refused.to_string(),
        ]);
    }
    // Columns as wide as their widest cell (a process shown as exited, an IPv6 prefix), at least
    // the usual width; the numbers right-aligned.
    let mut widths = [5, 20, 13, 24, 18, 8, 10, 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| if i >= 5 { format!("{cell:>w$}") } else { format!("{cell:<w$}") })
            .collect();
        out.push_str(&format!("{}\n", cells.join(" ")));
    }
    for line in views.iter().filter_map(BindingView::incomplete) {
        out.push_str(&format!("WARNING: {line}\n"));
    }
    if listing.detached {
        out.push_str(&format!("WARNING: {DETACHED_WARNING}\n"));
    }
    out.push_str(&elsewhere);
    out
}
