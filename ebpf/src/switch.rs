//! The `--fast-path auto|off` switch.

use std::fmt;
use std::str::FromStr;

use crate::FastPath;

/// Whether the agent runs the fast path: `auto` (when [`FastPath::supported`]) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    #[default]
    Auto,
    Off,
}

impl Switch {
    /// Whether to load the fast path here: `off` never probes; `auto` probes the kernel.
    pub fn enabled(self) -> bool {
        match self {
            Switch::Off => false,
            Switch::Auto => FastPath::supported(),
        }
    }
}

impl FromStr for Switch {
    type Err = String;

    fn from_str(s: &str) -> Result<Switch, String> {
        match s {
            "auto" => Ok(Switch::Auto),
            "off" => Ok(Switch::Off),
            other => Err(format!("fast path {other:?}: expected auto or off")),
        }
    }
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Switch::Auto => "auto",
            Switch::Off => "off",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, want) in [("auto", Switch::Auto), ("off", Switch::Off)] {
            let got: Switch = s.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), s);
        }
        let err = "on".parse::<Switch>().unwrap_err();
        assert!(err.contains("expected auto or off"), "{err}");
        assert!(!Switch::Off.enabled());
    }
}
