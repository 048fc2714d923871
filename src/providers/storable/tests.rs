use super::*;
use serde_json::json;

const DEPTH: usize = 64;

fn nested(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Every string in `value` (keys too) is free of NUL.
fn assert_no_nul(value: &Value) {
    match value {
        Value::String(s) => assert!(!s.contains('\0'), "{s:?}"),
        Value::Array(items) => items.iter().for_each(assert_no_nul),
        Value::Object(map) => {
            for (k, v) in map {
                assert!(!k.contains('\0'), "{k:?}");
                assert_no_nul(v);
            }
        }
        _ => {}
    }
}

fn container_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(container_depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(container_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// What a repaired text must be: parseable, NUL-free, within the depth, and
/// a fixed point of the repair.
fn assert_repaired_well(repaired: &str) {
    let value: Value = serde_json::from_str(repaired)
        .unwrap_or_else(|e| panic!("repaired text does not parse ({e}): {repaired:.200}"));
    assert_no_nul(&value);
    assert!(container_depth(&value) <= DEPTH);
    let (again, more) = repair_json_text(repaired, DEPTH);
    assert!(
        matches!(again, Cow::Borrowed(_)),
        "repairing twice changed more"
    );
    assert!(more.is_empty(), "{more:?}");
}

#[test]
fn what_serde_json_refuses_and_what_it_reads_as_something_else() {
    // Why the text pass exists: serde_json 1.x refuses these outright.
    for refused in [
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        "1e400",
        "-1e400",
        "\"a\u{0}b\"",
        "\"tab\tin a string\"",
    ] {
        assert!(
            serde_json::from_str::<Value>(refused).is_err(),
            "{refused:?}"
        );
    }
    assert!(serde_json::from_str::<Value>(&nested(128, "1")).is_err());
    assert!(serde_json::from_str::<Value>(&nested(127, "1")).is_ok());
    // ...and these it reads, but not as sent.
    assert_eq!(
        serde_json::from_str::<Value>("1.0e-400").unwrap().as_f64(),
        Some(0.0)
    );
    assert_eq!(
        serde_json::from_str::<Value>(r#""\u0000""#).unwrap(),
        Value::String("\0".into()),
        "a NUL PostgreSQL refuses in jsonb and text"
    );
}

#[test]
fn hostile_texts_are_repaired_case_by_case() {
    let r = |nul, lone_surrogate, control_char, number_as_text, cut_depth| Repairs {
        nul,
        lone_surrogate,
        control_char,
        number_as_text,
        cut_depth,
        ..Repairs::default()
    };
    let deep_cut = format!("[[{}]]", "\"<cut: nested deeper than 2 levels>\"");
    // (input, max depth, expected text, expected repairs)
    let table: Vec<(String, usize, String, Repairs)> = vec![
        (
            r#""a\u0000b""#.into(),
            DEPTH,
            r#""a\ufffdb""#.into(),
            r(1, 0, 0, 0, 0),
        ),
        (
            "\"a\u{0}b\"".into(),
            DEPTH,
            r#""a\ufffdb""#.into(),
            r(1, 0, 0, 0, 0),
        ),
        (
            r#""\ud800""#.into(),
            DEPTH,
            r#""\ufffd""#.into(),
            r(0, 1, 0, 0, 0),
        ),
        (
            r#""\uDBFFx""#.into(),
            DEPTH,
            r#""\ufffdx""#.into(),
            r(0, 1, 0, 0, 0),
        ),
        (
            r#""\udc00""#.into(),
            DEPTH,
            r#""\ufffd""#.into(),
            r(0, 1, 0, 0, 0),
        ),
        // A high surrogate followed by another escape that is not its low half.
        (
            r#""\ud800\u0041""#.into(),
            DEPTH,
            r#""\ufffd\u0041""#.into(),
            r(0, 1, 0, 0, 0),
        ),
        (
            r#""\ud800\n""#.into(),
            DEPTH,
            r#""\ufffd\n""#.into(),
            r(0, 1, 0, 0, 0),
        ),
        // Two highs, the second one paired: only the first is lone.
        (
            r#""\ud800\ud83d\ude00""#.into(),
            DEPTH,
            r#""\ufffd\ud83d\ude00""#.into(),
            r(0, 1, 0, 0, 0),
        ),
        // A low before a high: both lone.
        (
            r#""\ude00\ud83d""#.into(),
            DEPTH,
            r#""\ufffd\ufffd""#.into(),
            r(0, 2, 0, 0, 0),
        ),
        (
            "\"line\nbreak\ttab\r\u{1}\u{8}\u{c}\u{1f}\"".into(),
            DEPTH,
            r#""line\nbreak\ttab\r\u0001\b\f\u001f""#.into(),
            r(0, 0, 7, 0, 0),
        ),
        // In keys as in values.
        (
            r#"{"k\u0000":"\udfff"}"#.into(),
            DEPTH,
            r#"{"k\ufffd":"\ufffd"}"#.into(),
            r(1, 1, 0, 0, 0),
        ),
        ("1e400".into(), DEPTH, r#""1e400""#.into(), r(0, 0, 0, 1, 0)),
        (
            r#"{"n":-1E+400}"#.into(),
            DEPTH,
            r#"{"n":"-1E+400"}"#.into(),
            r(0, 0, 0, 1, 0),
        ),
        (
            "[1.0e-400]".into(),
            DEPTH,
            r#"["1.0e-400"]"#.into(),
            r(0, 0, 0, 1, 0),
        ),
        (
            format!("[1{}]", "0".repeat(400)),
            DEPTH,
            format!("[\"1{}\"]", "0".repeat(400)),
            r(0, 0, 0, 1, 0),
        ),
        (
            format!("[0.{}1]", "0".repeat(400)),
            DEPTH,
            format!("[\"0.{}1\"]", "0".repeat(400)),
            r(0, 0, 0, 1, 0),
        ),
        ("[[[1]]]".into(), 2, deep_cut.clone(), r(0, 0, 0, 0, 1)),
        (
            r#"[{"a":{"b":"]}"}}]"#.into(),
            2,
            r#"[{"a":"<cut: nested deeper than 2 levels>"}]"#.into(),
            r(0, 0, 0, 0, 1),
        ),
        // What is inside a cut subtree is not counted: it is gone.
        (
            r#"[[["\u0000", 1e400]], [[2]]]"#.into(),
            2,
            r#"[["<cut: nested deeper than 2 levels>"], ["<cut: nested deeper than 2 levels>"]]"#
                .into(),
            r(0, 0, 0, 0, 2),
        ),
    ];
    for (input, depth, expected, repairs) in table {
        let (got, counted) = repair_json_text(&input, depth);
        assert_eq!(got, expected, "{input:.80}");
        assert_eq!(counted, repairs, "{input:.80}");
        assert!(matches!(got, Cow::Owned(_)));
        if depth == DEPTH {
            assert_repaired_well(&got);
        } else {
            let (again, more) = repair_json_text(&got, depth);
            assert_eq!(again, got);
            assert!(more.is_empty());
        }
    }
}

#[test]
fn valid_json_passes_unchanged_and_unallocated() {
    let deep_enough = nested(DEPTH, "1");
    let table = [
        r#"{"a":[1,2.5,-0,0.0,-0.0e0,1e308,5e-324,0e-400,true,null],"b":"x"}"#,
        r#""\ud83d\ude00 and \u00e9 and \ufffd""#,
        // An escaped backslash followed by the letters u0000: no NUL.
        r#""\\u0000 \\ud800""#,
        r#""quote \" inside, slash \/ and \b\f\n\r\t""#,
        "\"utf-8 \u{e9}\u{4e2d}\u{1f600} in the text\"",
        "  [ ]  ",
        "123456789012345678901234567890",
        "99999999.99999999",
        "0.00028780",
        r#""0.00028780""#,
        &deep_enough,
        r#"{"nested":"[[[[[[[[[[ in a string ]]]]"}"#,
        "",
    ];
    for text in table {
        let (got, repairs) = repair_json_text(text, DEPTH);
        assert!(matches!(got, Cow::Borrowed(_)), "{text:.80}");
        assert!(repairs.is_empty(), "{text:.80}: {repairs:?}");
    }
}

#[test]
fn invalid_json_stays_invalid_and_is_not_guessed_at() {
    for text in [
        "<html>502</html>",
        "{\"a\":",
        "\"unterminated",
        "[01]",
        "[1.]",
        "[--1]",
        r#""\x""#,
        r#""\u12""#,
    ] {
        let (got, _) = repair_json_text(text, DEPTH);
        assert!(serde_json::from_str::<Value>(&got).is_err(), "{text}");
    }
    // Unbalanced closers do not make the depth go negative.
    let (got, _) = repair_json_text("]]]][[1]]", 1);
    assert_eq!(got, "]]]][\"<cut: nested deeper than 1 levels>\"]");
    // A text that ends inside a cut subtree still ends with the marker.
    let (got, repairs) = repair_json_text("[[[", 1);
    assert_eq!(got, "[\"<cut: nested deeper than 1 levels>\"");
    assert_eq!(repairs.cut_depth, 1);
}

#[test]
fn everything_at_once_and_two_hundred_levels_deep() {
    let text = format!(
        r#"{{"a\u0000b":"x\u0000y","s":"\ud800 lone","n":1e400,"tiny":-1.0e-400,"ok":0.00028780,"money":"0.00028780","deep":{},"raw":"tab{}"}}"#,
        nested(200, r#""\u0000""#),
        '\t'
    );
    let (got, repairs) = repair_json_text(&text, DEPTH);
    assert_eq!(
        repairs,
        Repairs {
            nul: 2,
            lone_surrogate: 1,
            control_char: 1,
            number_as_text: 2,
            cut_depth: 1,
            ..Repairs::default()
        }
    );
    assert_repaired_well(&got);
    let value: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(value["a\u{FFFD}b"], "x\u{FFFD}y");
    assert_eq!(value["s"], "\u{FFFD} lone");
    assert_eq!(value["n"], "1e400");
    assert_eq!(value["tiny"], "-1.0e-400");
    assert_eq!(value["raw"], "tab\t");
    // The deep array keeps 63 levels under the root object, then the marker.
    assert_eq!(container_depth(&value), DEPTH);
    assert!(got.contains("0.00028780") && got.contains(r#""0.00028780""#));
}

#[test]
fn money_is_read_from_the_exact_digits_after_repair() {
    use crate::money::{WireAmount, parse_amount};
    #[derive(Deserialize)]
    struct Amounts {
        number: WireAmount,
        string: WireAmount,
        long: WireAmount,
        huge: WireAmount,
    }
    let text = r#"{"number":0.00028780,"string":"0.00028780","long":99999999.99999999,"huge":1e400,"junk":"\u0000\ud800"}"#;
    let (repaired, repairs) = repair_json_text(text, DEPTH);
    assert_eq!(repairs.number_as_text, 1);
    let amounts: Amounts = serde_json::from_str(&repaired).unwrap();
    let exact = |s: &str| Some(rust_decimal::Decimal::from_str_exact(s).unwrap());
    let number = parse_amount("number", Some(&amounts.number)).unwrap();
    assert_eq!(number, exact("0.00028780"));
    assert_eq!(number.unwrap().to_string(), "0.00028780", "scale kept");
    let string = parse_amount("string", Some(&amounts.string)).unwrap();
    assert_eq!(string.unwrap().to_string(), "0.00028780");
    assert_eq!(
        parse_amount("long", Some(&amounts.long)).unwrap(),
        exact("99999999.99999999")
    );
    // A number beyond f64 keeps its digits as text: the amount parser sees
    // exactly `1e400`, and refuses it rather than reading something else.
    let err = parse_amount("huge", Some(&amounts.huge)).unwrap_err();
    assert_eq!(err.value, "1e400");
}

#[test]
fn bodies_that_are_not_utf8_are_repaired_too() {
    let (got, repairs) = repair_json_bytes(b"{\"a\":\"x\xff\xfey\",\"b\":\"\\u0000\"}", DEPTH);
    assert_eq!(got, "{\"a\":\"x\u{FFFD}\u{FFFD}y\",\"b\":\"\\ufffd\"}");
    assert_eq!((repairs.invalid_utf8, repairs.nul), (2, 1));
    assert_repaired_well(&got);
    let (got, repairs) = repair_json_bytes(br#"{"a":1}"#, DEPTH);
    assert!(matches!(got, Cow::Borrowed(_)) && repairs.is_empty());
    let (got, repairs) = repair_json_bytes(b"[\"\xc3\"]", DEPTH);
    assert_eq!((got.as_ref(), repairs.invalid_utf8), ("[\"\u{FFFD}\"]", 1));
}

fn limits(max_string_bytes: usize, max_value_bytes: usize, max_depth: usize) -> AnswerLimits {
    AnswerLimits {
        max_string_bytes,
        max_value_bytes,
        max_depth,
    }
}

#[test]
fn parsed_values_are_made_storable_case_by_case() {
    let l = limits(200, 1 << 20, 3);
    let r = |nul, cut_depth, cut_strings, renamed_keys| Repairs {
        nul,
        cut_depth,
        cut_strings,
        renamed_keys,
        ..Repairs::default()
    };
    let deep = json!({"a": {"b": {"c": {"d": 1}}}});
    // (input, expected, repairs)
    let table = [
        (
            json!({"k\u{0}": "v\u{0}\u{0}"}),
            json!({"k\u{FFFD}": "v\u{FFFD}\u{FFFD}"}),
            r(3, 0, 0, 0),
        ),
        // A repaired key that meets a key already taken gets a suffix; the
        // key that needed no repair keeps its name.
        (
            json!({"a\u{0}": 1, "a\u{FFFD}": 2}),
            json!({"a\u{FFFD}": 2, "a\u{FFFD}~2": 1}),
            r(1, 0, 0, 1),
        ),
        (
            deep,
            json!({"a": {"b": {"c": "<cut: nested deeper than 3 levels>"}}}),
            r(0, 1, 0, 0),
        ),
        (
            json!([[[[]]], [[1]]]),
            json!([[["<cut: nested deeper than 3 levels>"]], [[1]]]),
            r(0, 1, 0, 0),
        ),
        (
            json!([1, "x", null, true, {"n": 1.5}]),
            json!([1, "x", null, true, {"n": 1.5}]),
            r(0, 0, 0, 0),
        ),
        (json!("a\u{0}"), json!("a\u{FFFD}"), r(1, 0, 0, 0)),
    ];
    for (input, expected, repairs) in table {
        let (got, counted) = make_storable(input.clone(), &l);
        assert_eq!(got, expected, "{input}");
        assert_eq!(counted, repairs, "{input}");
        let (again, more) = make_storable(got.clone(), &l);
        assert_eq!((again, more), (got, Repairs::default()), "idempotent");
    }
}

#[test]
fn long_strings_and_keys_are_cut_at_a_character_boundary_with_size_and_hash() {
    let limit = 1024 * 1024;
    let l = limits(limit, 16 << 20, DEPTH);
    // Two-byte characters, so the limit falls inside one.
    let long = "é".repeat(1024 * 1024);
    let hash = hex::encode(Sha256::digest(long.as_bytes()));
    let mut map = Map::new();
    map.insert("text".into(), json!(long));
    map.insert(long.clone(), json!(1));
    let (got, repairs) = make_storable(Value::Object(map), &l);
    assert_eq!(repairs.cut_strings, 2);
    let text = got["text"].as_str().unwrap();
    assert!(text.len() <= limit, "{}", text.len());
    let marker = format!("…<cut: 2097152 bytes, sha256 {hash}>");
    assert!(text.ends_with(&marker), "{}", &text[text.len() - 120..]);
    assert!(long.starts_with(&text[..text.len() - marker.len()]));
    assert!(
        text.len() > limit - marker.len() - 2,
        "cut no more than needed"
    );
    let key = got
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "text")
        .unwrap();
    assert!(key.len() <= limit && key.ends_with(&marker));
    let (again, more) = make_storable(got.clone(), &l);
    assert_eq!((again, more.is_empty()), (got, true));
}

#[test]
fn a_value_too_large_as_a_whole_becomes_a_marker() {
    // The marker (about 130 bytes) fits a string, as the configuration
    // makes sure (`http.max_string_bytes` >= 1024).
    let l = limits(1000, 1000, DEPTH);
    let big = json!((0..200).map(|i| format!("item {i}")).collect::<Vec<_>>());
    let size = serde_json::to_string(&big).unwrap().len();
    let hash = hex::encode(Sha256::digest(serde_json::to_string(&big).unwrap()));
    let (got, repairs) = make_storable(big, &l);
    assert_eq!(
        got,
        json!(format!(
            "<cut: {size} bytes of JSON, over the limit of 1000 bytes, sha256 {hash}>"
        ))
    );
    assert_eq!(repairs.cut_values, 1);
    let (again, more) = make_storable(got.clone(), &l);
    assert_eq!((again, more.is_empty()), (got, true));
    let small = json!({"a": [1, 2, 3]});
    assert_eq!(
        make_storable(small.clone(), &l),
        (small, Repairs::default())
    );
}

#[test]
fn text_columns_lose_nul_and_length_only() {
    let table: [(&str, usize, &str); 4] = [
        ("plain", 10, "plain"),
        ("a\u{0}b", 10, "a\u{FFFD}b"),
        ("exactly ten", 11, "exactly ten"),
        ("\u{0}", 3, "\u{FFFD}"),
    ];
    for (text, limit, expected) in table {
        assert_eq!(storable_text(text, limit), expected);
    }
    assert!(matches!(storable_text("plain", 10), Cow::Borrowed(_)));
    let long = "x".repeat(5000);
    let cut = storable_text(&long, 4096);
    assert!(
        cut.len() <= 4096 && cut.starts_with("xxx") && cut.contains("…<cut: 5000 bytes, sha256 ")
    );
    assert_eq!(storable_text(&cut, 4096), cut, "idempotent");
    let mut repairs = Repairs::default();
    let _ = fix_text("a\u{0}\u{0}", 10, &mut repairs);
    assert_eq!(repairs.nul, 2);
}

#[test]
fn repairs_serialise_to_a_small_object() {
    assert!(Repairs::default().is_empty());
    assert_eq!(Repairs::default().to_json(), json!({}));
    let mut repairs = Repairs {
        nul: 2,
        lone_surrogate: 1,
        ..Repairs::default()
    };
    repairs += Repairs {
        cut_strings: 1,
        nul: 1,
        ..Repairs::default()
    };
    assert!(!repairs.is_empty());
    assert_eq!(
        repairs.to_json(),
        json!({"nul": 3, "lone_surrogate": 1, "cut_strings": 1})
    );
    let back: Repairs = serde_json::from_value(repairs.to_json()).unwrap();
    assert_eq!(back, repairs);
    let every = Repairs {
        nul: 1,
        lone_surrogate: 1,
        control_char: 1,
        invalid_utf8: 1,
        number_as_text: 1,
        cut_depth: 1,
        cut_strings: 1,
        cut_values: 1,
        renamed_keys: 1,
    };
    let keys: Vec<String> = every
        .to_json()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys.len(), 9, "{keys:?}");
}

#[test]
fn limits_come_from_the_http_config() {
    let l = AnswerLimits::default();
    assert_eq!(
        (l.max_string_bytes, l.max_value_bytes, l.max_depth),
        (1 << 20, 16 << 20, 64)
    );
}
