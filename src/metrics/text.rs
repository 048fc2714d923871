//! The Prometheus text exposition format, version 0.0.4, written by hand:
//! `# HELP` and `# TYPE` lines, then one `name{label="value"} number` line
//! per sample, each metric's samples together.

use std::fmt::{self, Display, Write};

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a metric is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (restarts at 0 with the process).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted into fixed buckets, with their sum.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A float as Prometheus writes it (`+Inf`, `-Inf`, `NaN`; never an exponent
/// it cannot read back: Rust's `Display` for `f64` writes plain digits).
#[derive(Debug, Clone, Copy)]
pub struct F64(pub f64);

impl Display for F64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// A histogram's state at one instant: counts per bucket (not cumulative),
/// the last one for observations above every bound, and the sum.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, ascending.
    pub bounds: &'static [f64],
    /// Observations per bucket; one more than `bounds` (the `+Inf` rest).
    pub counts: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
}

/// A scrape answer being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts metric `name`: its `# HELP` and `# TYPE` lines. Every sample
    /// of the metric must follow before the next header.
    pub fn header(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            escape_help(help),
            kind.as_str()
        );
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// The lines of one histogram series: cumulative `_bucket`s with `le`,
    /// `+Inf` equal to `_count`, then `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let mut cumulative = 0u64;
        let bounds = h.bounds.iter().map(|b| F64(*b)).chain([F64(f64::INFINITY)]);
        for (bound, count) in bounds.zip(&h.counts) {
            cumulative += count;
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&bound.to_string()));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.sample(&format!("{name}_sum"), labels, F64(h.sum));
        self.sample(&format!("{name}_count"), labels, cumulative);
    }

    /// A comment line (for a part of the answer that could not be produced).
    pub fn comment(&mut self, text: &str) {
        let _ = writeln!(self.out, "# {}", text.replace(['\n', '\r'], " "));
    }

    /// Appends an answer written separately (e.g. a cached part).
    pub fn append(&mut self, other: &str) {
        self.out.push_str(other);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
    for (i, (name, value)) in all.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape_label_value(value));
    }
    out.push('}');
}

/// A label value as the format requires: backslash, double quote and line
/// feed escaped as `\\`, `\"` and `\n`.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `# HELP` text: backslash and line feed escaped (quotes stay).
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("two\nlines"), r"two\nlines");
        assert_eq!(escape_label_value("plain ünïcode"), "plain ünïcode");
        let mut e = Exposition::new();
        e.sample("x_total", &[("code", "q\"\\\n"), ("p", "y")], 3);
        assert_eq!(e.finish(), "x_total{code=\"q\\\"\\\\\\n\",p=\"y\"} 3\n");
    }

    #[test]
    fn headers_and_samples() {
        let mut e = Exposition::new();
        e.header(
            "wfq_a_total",
            Kind::Counter,
            "first line\nsecond \\ \"quoted\"",
        );
        e.sample("wfq_a_total", &[], 7);
        e.header("wfq_b", Kind::Gauge, "b");
        e.sample("wfq_b", &[("k", "v")], F64(0.25));
        e.comment("oops\nmultiline");
        assert_eq!(
            e.finish(),
            "# HELP wfq_a_total first line\\nsecond \\\\ \"quoted\"\n# TYPE wfq_a_total counter\nwfq_a_total 7\n\
             # HELP wfq_b b\n# TYPE wfq_b gauge\nwfq_b{k=\"v\"} 0.25\n# oops multiline\n"
        );
    }

    #[test]
    fn floats() {
        assert_eq!(F64(1.0).to_string(), "1");
        assert_eq!(F64(0.005).to_string(), "0.005");
        assert_eq!(F64(1e-9).to_string(), "0.000000001");
        assert_eq!(F64(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(F64(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(F64(f64::NAN).to_string(), "NaN");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let mut e = Exposition::new();
        let h = HistogramSnapshot {
            bounds: &[0.1, 1.0],
            counts: vec![2, 0, 3],
            sum: 12.5,
        };
        e.histogram("d_seconds", &[("call", "poll")], &h);
        assert_eq!(
            e.finish(),
            "d_seconds_bucket{call=\"poll\",le=\"0.1\"} 2\n\
             d_seconds_bucket{call=\"poll\",le=\"1\"} 2\n\
             d_seconds_bucket{call=\"poll\",le=\"+Inf\"} 5\n\
             d_seconds_sum{call=\"poll\"} 12.5\n\
             d_seconds_count{call=\"poll\"} 5\n"
        );
    }
}
