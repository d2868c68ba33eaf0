//! Port lists as users write them (`7,77,777,8000-8999`): parsed once, at the edge.
use std::{fmt, str::FromStr};

/// An inclusive range of ports, `lo <= hi`, never containing 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    pub fn len(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.lo..=self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A list of ports and ranges, in the order written, without exact duplicates. Overlapping items
/// are kept as written (steer binds each item separately; --ports only needs the union).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList {
    items: Vec<PortRange>,
}

impl PortList {
    pub fn items(&self) -> &[PortRange] {
        &self.items
    }

    /// Every port in the list once, ascending.
    pub fn ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.items.iter().flat_map(|r| r.ports()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.items.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

fn port(s: &str, item: &str) -> Result<u16, String> {
    // Digits only: `u64::from_str` takes a leading `+`, which no address flag does.
    let s = s.trim();
    let n: u64 = s
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())
        .flatten()
        .ok_or_else(|| format!("`{item}` is not a port or a range of ports (write e.g. 7,77,777,8000-8999)"))?;
    match n {
        1..=65535 => Ok(n as u16),
        _ => Err(format!("port {n} is out of range (ports are 1 to 65535)")),
    }
}

impl FromStr for PortList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut items = Vec::new();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("`{s}` has an empty item (write e.g. 7,77,777,8000-8999)"));
            }
            let range = match item.split_once('-') {
                None => PortRange::single(port(item, item)?),
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo, item)?, port(hi, item)?);
                    if lo > hi {
                        return Err(format!("range {item} runs backwards (write {hi}-{lo})"));
                    }
                    PortRange { lo, hi }
                }
            };
            if !items.contains(&range) {
                items.push(range);
            }
        }
        Ok(PortList { items })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PortList, String> {
        s.parse()
    }

    #[test]
    fn ports_and_ranges() {
        let l = parse("7,77,777,8000-8999").unwrap();
        assert_eq!(l.items().len(), 4);
        assert_eq!(l.items()[3], PortRange { lo: 8000, hi: 8999 });
        assert_eq!(l.ports().len(), 1003);
        assert_eq!(l.to_string(), "7,77,777,8000-8999");
        assert_eq!(parse(" 1 , 65535 ").unwrap().ports(), vec![1, 65535]);
        assert_eq!(parse("5-5").unwrap().items(), &[PortRange::single(5)]);
    }

    #[test]
    fn overlaps_are_fine_and_duplicates_merge() {
        let l = parse("10-20,15-25,17,17").unwrap();
        assert_eq!(l.items().len(), 3);
        assert_eq!(l.ports(), (10..=25).collect::<Vec<u16>>());
    }

    #[test]
    fn bad_lists_say_why() {
        assert_eq!(parse("0").unwrap_err(), "port 0 is out of range (ports are 1 to 65535)");
        assert!(parse("+80").unwrap_err().contains("is not a port"));
        assert!(parse("7901-+7903").unwrap_err().contains("is not a port"));
        assert_eq!(parse("70000").unwrap_err(), "port 70000 is out of range (ports are 1 to 65535)");
        assert_eq!(parse("9-3").unwrap_err(), "range 9-3 runs backwards (write 3-9)");
        assert!(parse("abc").unwrap_err().starts_with("`abc` is not a port"));
        assert!(parse("1-").unwrap_err().starts_with("`1-` is not a port"));
        assert!(parse("1,,2").unwrap_err().contains("empty item"));
        assert!(parse("").unwrap_err().contains("empty item"));
        assert!(parse("-5").unwrap_err().starts_with("`-5` is not a port"));
        assert!(parse("99999999999999999999").unwrap_err().contains("not a port"));
    }
}
