//! `skrelay status`: one overview of everything skrelay has attached in this network namespace,
//! as a list of sections, one per job that can leave things attached. Each job returns plain data
//! (`steer::status`, `accel::reports`); this module renders it. Reads under shared locks and
//! creates nothing.
use crate::{accel, cli::StatusArgs, error::Error, steer};

/// One job's part of the overview.
pub struct Section {
    /// Key in the JSON object (`steer`, `accel`, `relays`).
    pub name: &'static str,
    /// Human-readable lines.
    pub text: String,
    pub json: serde_json::Value,
}

/// Every section, in the order shown. Add a job's section here.
pub fn sections() -> Result<Vec<Section>, Error> {
    let steer = steer::status()?;
    let accel = accel::reports()?;
    Ok(vec![
        Section { name: "steer", text: steer.text(), json: steer.json() },
        Section { name: "accel", text: accel.text(), json: accel.json() },
        crate::running::status_section(),
    ])
}

/// The overview as text for stdout (JSON with `--json`).
pub fn run(args: StatusArgs) -> Result<String, Error> {
    let sections = sections()?;
    if args.json {
        let mut obj = serde_json::Map::new();
        obj.insert("netns".into(), crate::sys::own_netns_inode().map(serde_json::Value::from).unwrap_or_default());
        for s in sections {
            obj.insert(s.name.into(), s.json);
        }
        Ok(format!("{}\n", serde_json::to_string_pretty(&serde_json::Value::Object(obj)).expect("json")))
    } else {
        Ok(sections.iter().map(|s| format!("{}\n", s.text)).collect())
    }
}
