//! Provider answers made storable before they become typed values.
//!
//! PostgreSQL refuses `\u0000` and lone UTF-16 surrogates in `jsonb` and
//! the NUL character in `text`; serde_json refuses lone surrogate escapes,
//! numbers beyond `f64` and nesting past its recursion limit. A provider
//! that sends any of these would make every status check of a run fail the
//! same way until its deadline. So every answer is repaired here, once, at
//! the edge: [`repair_json_text`] on the raw JSON text (before serde_json
//! sees it), [`make_storable`] on parsed values, [`storable_text`] on text
//! columns. What was changed is counted in [`Repairs`], so the worker can
//! record that an answer was altered to be stored.
//!
//! Numbers are rewritten only when serde_json would refuse them or read a
//! non-zero number as zero; such a number becomes a JSON string of its own
//! digits. Every other number keeps its exact text, which is what the money
//! parsing (`crate::money`, from the raw text, never through `f64`) reads.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::HttpConfig;

/// What an answer may hold once stored (from `[http]` in worker.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerLimits {
    /// Longest string (or object key) kept whole, in bytes; longer ones are
    /// cut at a character boundary and end with a marker naming their size
    /// and SHA-256.
    pub max_string_bytes: usize,
    /// Largest value, as serialised JSON, kept; a larger one is replaced by
    /// a marker. Also the most of a body a client reads.
    pub max_value_bytes: usize,
    /// Deepest nesting of arrays and objects kept; deeper subtrees become
    /// the string `"<cut: nested deeper than N levels>"`.
    pub max_depth: usize,
}

impl From<&HttpConfig> for AnswerLimits {
    fn from(http: &HttpConfig) -> Self {
        AnswerLimits {
            max_string_bytes: http.max_string_bytes,
            max_value_bytes: http.max_answer_bytes,
            max_depth: http.max_depth,
        }
    }
}

impl Default for AnswerLimits {
    fn default() -> Self {
        AnswerLimits::from(&HttpConfig::default())
    }
}

/// How many changes of each kind made an answer storable. Serialises to a
/// small JSON object of the kinds that occurred, e.g.
/// `{"nul": 2, "lone_surrogate": 1, "cut_strings": 1}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Repairs {
    /// NUL characters (escaped `\u0000` or raw) replaced with U+FFFD.
    #[serde(skip_serializing_if = "is_zero")]
    pub nul: u64,
    /// Lone UTF-16 surrogate escapes replaced with U+FFFD.
    #[serde(skip_serializing_if = "is_zero")]
    pub lone_surrogate: u64,
    /// Raw control characters inside strings (invalid JSON) escaped.
    #[serde(skip_serializing_if = "is_zero")]
    pub control_char: u64,
    /// Invalid UTF-8 sequences replaced with U+FFFD.
    #[serde(skip_serializing_if = "is_zero")]
    pub invalid_utf8: u64,
    /// Numbers `f64` cannot hold (infinite, or a non-zero number read as
    /// zero), kept as a JSON string of their digits.
    #[serde(skip_serializing_if = "is_zero")]
    pub number_as_text: u64,
    /// Subtrees nested deeper than `max_depth`, replaced by a marker.
    #[serde(skip_serializing_if = "is_zero")]
    pub cut_depth: u64,
    /// Strings and keys longer than `max_string_bytes`, cut.
    #[serde(skip_serializing_if = "is_zero")]
    pub cut_strings: u64,
    /// Whole values larger than `max_value_bytes`, replaced by a marker.
    #[serde(skip_serializing_if = "is_zero")]
    pub cut_values: u64,
    /// Object keys renamed because their repaired form was taken already.
    #[serde(skip_serializing_if = "is_zero")]
    pub renamed_keys: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Repairs {
    /// True when nothing was changed.
    pub fn is_empty(&self) -> bool {
        *self == Repairs::default()
    }

    /// The counts as a JSON object (only the kinds that occurred).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl std::ops::AddAssign for Repairs {
    fn add_assign(&mut self, other: Repairs) {
        self.nul += other.nul;
        self.lone_surrogate += other.lone_surrogate;
        self.control_char += other.control_char;
        self.invalid_utf8 += other.invalid_utf8;
        self.number_as_text += other.number_as_text;
        self.cut_depth += other.cut_depth;
        self.cut_strings += other.cut_strings;
        self.cut_values += other.cut_values;
        self.renamed_keys += other.renamed_keys;
    }
}

/// The escape that replaces what cannot be stored (U+FFFD).
const REPLACEMENT_ESCAPE: &str = "\\ufffd";

/// The string a subtree nested too deeply is replaced with.
pub fn depth_marker(max_depth: usize) -> String {
    format!("<cut: nested deeper than {max_depth} levels>")
}

/// [`repair_json_text`] for a body that may not be UTF-8: invalid
/// sequences become U+FFFD first (counted as `invalid_utf8`).
pub fn repair_json_bytes(body: &[u8], max_depth: usize) -> (Cow<'_, str>, Repairs) {
    if let Ok(text) = std::str::from_utf8(body) {
        return repair_json_text(text, max_depth);
    }
    let mut repairs = Repairs::default();
    let mut text = String::with_capacity(body.len() + 16);
    for chunk in body.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            text.push('\u{FFFD}');
            repairs.invalid_utf8 += 1;
        }
    }
    let (fixed, more) = repair_json_text(&text, max_depth);
    repairs += more;
    let fixed = match fixed {
        Cow::Borrowed(_) => text,
        Cow::Owned(fixed) => fixed,
    };
    (Cow::Owned(fixed), repairs)
}

/// Makes a syntactically valid but hostile JSON text parseable by serde_json
/// and storable by PostgreSQL, in one pass that knows strings and escapes:
///
/// - `\u0000`, a raw NUL in a string, and lone surrogate escapes (a high one
///   without its low one, a low one alone) become `\ufffd`;
/// - other raw control characters in strings become their escapes;
/// - a number serde_json refuses (`1e400`) or reads as zero though it is not
///   (`1.0e-400`) becomes a JSON string of its exact digits;
/// - an array or object nested deeper than `max_depth` becomes the string
///   [`depth_marker`].
///
/// A text that needs none of this comes back borrowed. Invalid JSON stays
/// invalid (serde_json reports it as before); nothing here guesses syntax.
pub fn repair_json_text(text: &str, max_depth: usize) -> (Cow<'_, str>, Repairs) {
    let mut pass = Pass {
        text,
        bytes: text.as_bytes(),
        out: None,
        copied: 0,
        repairs: Repairs::default(),
    };
    let len = pass.bytes.len();
    let mut depth = 0usize;
    // While a subtree is being cut: where it started and its depth.
    let mut cut: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < len {
        match pass.bytes[i] {
            b'"' => i = pass.string(i, cut.is_none()),
            b'{' | b'[' => {
                depth += 1;
                if cut.is_none() && depth > max_depth {
                    cut = Some((i, depth));
                }
                i += 1;
            }
            b'}' | b']' => {
                if let Some((start, cut_depth)) = cut
                    && cut_depth == depth
                {
                    pass.replace(start, i + 1, &format!("\"{}\"", depth_marker(max_depth)));
                    pass.repairs.cut_depth += 1;
                    cut = None;
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(pass.bytes, i);
                if cut.is_none() {
                    pass.number(i, end);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    if let Some((start, _)) = cut {
        // A text cut off inside the deep subtree: invalid either way.
        pass.replace(start, len, &format!("\"{}\"", depth_marker(max_depth)));
        pass.repairs.cut_depth += 1;
    }
    let repairs = pass.repairs;
    (pass.finish(), repairs)
}

/// One repair pass: the text, and the copy made once something changes.
struct Pass<'a> {
    text: &'a str,
    bytes: &'a [u8],
    out: Option<String>,
    /// How much of `text` is accounted for in `out`.
    copied: usize,
    repairs: Repairs,
}

impl<'a> Pass<'a> {
    /// Replaces `text[start..end]` (both at character boundaries: every
    /// replaced range starts and ends at ASCII bytes) with `with`.
    fn replace(&mut self, start: usize, end: usize, with: &str) {
        let out = self
            .out
            .get_or_insert_with(|| String::with_capacity(self.text.len() + 64));
        out.push_str(&self.text[self.copied..start]);
        out.push_str(with);
        self.copied = end;
    }

    fn finish(self) -> Cow<'a, str> {
        match self.out {
            None => Cow::Borrowed(self.text),
            Some(mut out) => {
                out.push_str(&self.text[self.copied..]);
                Cow::Owned(out)
            }
        }
    }

    /// Reads the string whose opening quote is at `start`; returns the index
    /// after its closing quote. `rewrite` is off inside a subtree being cut.
    fn string(&mut self, start: usize, rewrite: bool) -> usize {
        let bytes = self.bytes;
        let mut i = start + 1;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => return i + 1,
                b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                    let Some(unit) = hex4(bytes, i + 2) else {
                        // A broken escape: serde_json refuses it as before.
                        i += 2;
                        continue;
                    };
                    let lone = match unit {
                        0xD800..=0xDBFF => {
                            let paired = bytes.get(i + 6) == Some(&b'\\')
                                && bytes.get(i + 7) == Some(&b'u')
                                && hex4(bytes, i + 8)
                                    .is_some_and(|n| (0xDC00..=0xDFFF).contains(&n));
                            if paired {
                                i += 12;
                                continue;
                            }
                            true
                        }
                        0xDC00..=0xDFFF => true,
                        _ => false,
                    };
                    if rewrite && (lone || unit == 0) {
                        self.replace(i, i + 6, REPLACEMENT_ESCAPE);
                        if lone {
                            self.repairs.lone_surrogate += 1;
                        } else {
                            self.repairs.nul += 1;
                        }
                    }
                    i += 6;
                }
                b'\\' => i += 2,
                control @ 0x00..=0x1F => {
                    if rewrite {
                        let escape = match control {
                            0x00 => REPLACEMENT_ESCAPE.to_owned(),
                            0x08 => "\\b".to_owned(),
                            0x09 => "\\t".to_owned(),
                            0x0A => "\\n".to_owned(),
                            0x0C => "\\f".to_owned(),
                            0x0D => "\\r".to_owned(),
                            other => format!("\\u{other:04x}"),
                        };
                        self.replace(i, i + 1, &escape);
                        if control == 0 {
                            self.repairs.nul += 1;
                        } else {
                            self.repairs.control_char += 1;
                        }
                    }
                    i += 1;
                }
                _ => i += 1,
            }
        }
        bytes.len()
    }

    /// Checks the number token `text[start..end]`.
    fn number(&mut self, start: usize, end: usize) {
        let token = &self.text[start..end];
        if !needs_text(token) {
            return;
        }
        self.replace(start, end, &format!("\"{token}\""));
        self.repairs.number_as_text += 1;
    }
}

/// The four hex digits of a `\u` escape starting at `at`.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = bytes.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

/// Where the number token starting at `start` ends (lenient: the grammar is
/// checked afterwards).
fn number_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
        i += 1;
    }
    i
}

/// Whether a number token must become a string: it is valid JSON but
/// serde_json refuses it (out of `f64` range) or reads it as zero though a
/// digit of its mantissa is not.
fn needs_text(token: &str) -> bool {
    let Some(mantissa_nonzero) = json_number(token) else {
        return false;
    };
    // Short plain numbers are always within range: skip the full parse.
    if token.len() <= 15 && !token.contains(['e', 'E']) {
        return false;
    }
    match serde_json::from_str::<Value>(token) {
        Err(_) => true,
        Ok(Value::Number(n)) => mantissa_nonzero && n.as_f64() == Some(0.0),
        Ok(_) => false,
    }
}

/// Checks the JSON number grammar; `Some(mantissa has a non-zero digit)`.
fn json_number(token: &str) -> Option<bool> {
    let bytes = token.as_bytes();
    let mut i = usize::from(bytes.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let from = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - from
    };
    let int_start = i;
    let int_digits = digits(&mut i);
    if int_digits == 0 || (int_digits > 1 && bytes[int_start] == b'0') {
        return None;
    }
    let mut mantissa_end = i;
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return None;
        }
        mantissa_end = i;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return None;
        }
    }
    if i != bytes.len() {
        return None;
    }
    Some(
        bytes[int_start..mantissa_end]
            .iter()
            .any(|b| matches!(b, b'1'..=b'9')),
    )
}

/// Makes a parsed value storable: NUL in strings and keys becomes U+FFFD,
/// strings and keys over `max_string_bytes` are cut (with a marker naming
/// their size and SHA-256), subtrees deeper than `max_depth` become
/// [`depth_marker`], and a value whose JSON exceeds `max_value_bytes`
/// becomes a marker string naming its size and SHA-256.
pub fn make_storable(mut value: Value, limits: &AnswerLimits) -> (Value, Repairs) {
    let mut repairs = Repairs::default();
    walk(&mut value, 0, limits, &mut repairs);
    let size = json_size(&value);
    if size > limits.max_value_bytes {
        value = Value::String(format!(
            "<cut: {size} bytes of JSON, over the limit of {} bytes, sha256 {}>",
            limits.max_value_bytes,
            json_sha256(&value)
        ));
        repairs.cut_values += 1;
    }
    (value, repairs)
}

fn walk(value: &mut Value, depth: usize, limits: &AnswerLimits, repairs: &mut Repairs) {
    if (value.is_array() || value.is_object()) && depth >= limits.max_depth {
        *value = Value::String(depth_marker(limits.max_depth));
        repairs.cut_depth += 1;
        return;
    }
    match value {
        Value::String(s) => {
            if let Cow::Owned(fixed) = fix_text(s, limits.max_string_bytes, repairs) {
                *s = fixed;
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, depth + 1, limits, repairs);
            }
        }
        Value::Object(map) => {
            fix_keys(map, limits.max_string_bytes, repairs);
            for item in map.values_mut() {
                walk(item, depth + 1, limits, repairs);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Repairs the keys of `map`. Keys that need no repair keep their names; a
/// repaired key that collides with a taken one gets a `~2`, `~3`, ... suffix.
fn fix_keys(map: &mut Map<String, Value>, limit: usize, repairs: &mut Repairs) {
    if !map.keys().any(|k| k.contains('\0') || k.len() > limit) {
        return;
    }
    let old = std::mem::take(map);
    let mut changed = Vec::new();
    for (key, item) in old {
        match fix_text(&key, limit, repairs) {
            Cow::Borrowed(_) => {
                map.insert(key, item);
            }
            Cow::Owned(fixed) => changed.push((fixed, item)),
        }
    }
    for (key, item) in changed {
        let mut name = key.clone();
        let mut n = 2;
        while map.contains_key(&name) {
            name = format!("{key}~{n}");
            n += 1;
        }
        if name != key {
            repairs.renamed_keys += 1;
        }
        map.insert(name, item);
    }
}

/// Text for a `text` column: NUL becomes U+FFFD, and a text longer than
/// `limit` bytes is cut at a character boundary with a marker naming its
/// size and SHA-256 (the result stays within `limit` when `limit` leaves
/// room for the marker, about 100 bytes).
pub fn storable_text(text: &str, limit: usize) -> Cow<'_, str> {
    fix_text(text, limit, &mut Repairs::default())
}

/// [`storable_text`], counting what it changed.
pub(crate) fn fix_text<'a>(text: &'a str, limit: usize, repairs: &mut Repairs) -> Cow<'a, str> {
    let mut text = Cow::Borrowed(text);
    let nuls = text.bytes().filter(|b| *b == 0).count();
    if nuls > 0 {
        text = Cow::Owned(text.replace('\0', "\u{FFFD}"));
        repairs.nul += nuls as u64;
    }
    if text.len() <= limit {
        return text;
    }
    let marker = format!(
        "…<cut: {} bytes, sha256 {}>",
        text.len(),
        hex::encode(Sha256::digest(text.as_bytes()))
    );
    let keep = text.floor_char_boundary(limit.saturating_sub(marker.len()));
    repairs.cut_strings += 1;
    Cow::Owned(format!("{}{marker}", &text[..keep]))
}

/// The length of `value` as compact JSON, without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a sink that cannot fail cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The SHA-256 of `value` as compact JSON, without building the text.
fn json_sha256(value: &Value) -> String {
    struct Hash(Sha256);
    impl std::io::Write for Hash {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hash = Hash(Sha256::new());
    let _ = serde_json::to_writer(&mut hash, value);
    hex::encode(hash.0.finalize())
}

#[cfg(test)]
mod tests;
