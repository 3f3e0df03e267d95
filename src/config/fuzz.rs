//! Fuzzing of the configuration parser (issue 14): arbitrary text, and valid files with
//! values swapped for hostile ones (huge, negative, wrong type, malformed sizes and
//! durations), lines dropped, repeated or cut. `Config::parse` never panics, and every
//! refusal is located: a line inside the file, and for a check (a well-formed file that
//! does not make sense) the key at fault.
//!
//! 256 cases per property in `cargo test`; `TESSEL_FUZZ_CASES=N` runs more (tools/fuzz).

use super::*;
use proptest::prelude::*;

fn fuzz_cases() -> u32 {
    std::env::var("TESSEL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The shipped default with the optional sections its comments show, all valid.
fn full_config() -> String {
    format!(
        "{EMBEDDED_DEFAULT}
[[iscsi.target]]
volume = \"vol0\"
allowed_initiators = [\"iqn.2004-10.com.ubuntu:01:host1\"]
chap_user = \"host1\"
chap_secret = \"change-me-please\"
mutual_user = \"tessel\"
mutual_secret = \"and-me-as-well\"

[[export]]
volume = \"vol0\"
snapshot = \"nightly\"

[[schedule]]
volume = \"vol0\"
every = \"1h\"
keep = 24
"
    )
}

/// Values a careless or hostile file might hold where any value is expected.
const HOSTILE: &[&str] = &[
    "-1",
    "0",
    "18446744073709551615",
    "9223372036854775807",
    "99999999999999999999999",
    "1e308",
    "-0.0",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"x\"",
    "\"-1G\"",
    "\"0K\"",
    "\"16E\"",
    "\"99999999999P\"",
    "\"18446744073709551615\"",
    "\"1.5G\"",
    "\"4096 \"",
    "\" 8G\"",
    "\"0s\"",
    "\"99999999999999999d\"",
    "\"18446744073709551615s\"",
    "\"1h1h\"",
    "\"-5m\"",
    "\"999.999.999.999:99999\"",
    "\"[::1]:0\"",
    "\"*\"",
    "\"../../etc/passwd\"",
    "\"\\u0000\"",
    "[]",
    "[1, \"a\"]",
    "[99, 100000]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
];

#[derive(Clone, Debug)]
enum Edit {
    /// Replace the value of the n-th `key = value` line.
    Value(usize, String),
    /// Drop the n-th line.
    Drop(usize),
    /// Repeat the n-th line (a duplicate key, or a second table header).
    Repeat(usize),
    /// Insert a line before the n-th.
    Insert(usize, String),
    /// Cut the text at this fraction of its length (per mille; at a char boundary).
    Cut(usize),
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(HOSTILE).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<u64>().prop_map(|v| format!("\"{v}\"")),
        1 => "\"[0-9]{1,22}[KMGTPEkmgtpeBbs]?\"",
        1 => "\"[0-9]{1,12}[smhdw]\"",
        // A TOML string whatever it holds: the file stays well-formed.
        1 => "[ -~]{0,30}".prop_map(|s| format!("\"{}\"", s.replace(['\\', '"'], "/"))),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (any::<usize>(), value()).prop_map(|(n, v)| Edit::Value(n, v)),
        1 => any::<usize>().prop_map(Edit::Drop),
        1 => any::<usize>().prop_map(Edit::Repeat),
        1 => (
            any::<usize>(),
            prop_oneof![
                "[a-z_]{1,12} = [ -~]{0,20}",
                "\\[\\[?[a-z._]{1,12}\\]?\\]",
                "[ -~]{0,40}",
            ]
        )
            .prop_map(|(n, l)| Edit::Insert(n, l)),
        1 => (0..1000usize).prop_map(Edit::Cut),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for e in edits {
        let n = lines.len().max(1);
        match e {
            Edit::Value(k, v) => {
                let assignments: Vec<usize> = (0..lines.len())
                    .filter(|&i| !lines[i].starts_with('#') && lines[i].contains(" = "))
                    .collect();
                if let Some(&i) = assignments.get(k % assignments.len().max(1)) {
                    let key = lines[i].split(" = ").next().unwrap_or("").to_string();
                    lines[i] = format!("{key} = {v}");
                }
            }
            Edit::Drop(k) if !lines.is_empty() => {
                lines.remove(k % n);
            }
            Edit::Repeat(k) if !lines.is_empty() => {
                let l = lines[k % n].clone();
                lines.insert(k % n, l);
            }
            Edit::Insert(k, l) => lines.insert(k % (lines.len() + 1), l.clone()),
            Edit::Cut(per_mille) => {
                let joined = lines.join("\n");
                let mut at = joined.len() * per_mille / 1000;
                while !joined.is_char_boundary(at) {
                    at -= 1;
                }
                lines = joined[..at].lines().map(str::to_string).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

/// A refusal must point into the file: a line that exists, and for a check the key.
fn assert_located(text: &str, e: &ConfigError) -> Result<(), TestCaseError> {
    let Some(i) = e.invalid() else {
        return Err(TestCaseError::fail(format!("not located: {e}")));
    };
    prop_assert!(!i.message.is_empty(), "no message: {e}");
    let lines = text.lines().count().max(1) + 1;
    if let Some(line) = i.line {
        prop_assert!((1..=lines).contains(&line), "line {line} of {lines}: {e}");
    }
    match e {
        ConfigError::Check(i) => prop_assert!(i.key.is_some(), "check names no key: {e}"),
        ConfigError::Parse(i) => prop_assert!(i.line.is_some(), "parse error at no line: {e}"),
        ConfigError::Read { .. } => unreachable!("parse reads no file"),
    }
    Ok(())
}

#[test]
fn the_fuzzers_base_config_is_valid() {
    Config::parse(&full_config(), "full.toml").expect("the fuzzer's base config parses");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    #[test]
    fn arbitrary_text_is_parsed_or_refused_with_a_location(text in "(?s).{0,400}") {
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            assert_located(&text, &e)?;
        }
    }

    #[test]
    fn mutated_valid_configs_are_parsed_or_refused_with_key_and_line(
        edits in proptest::collection::vec(edit(), 1..5),
    ) {
        let text = apply(&full_config(), &edits);
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            assert_located(&text, &e)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    /// One value swapped in a well-formed file: the refusal names a key as well as a line
    /// (the one changed, or one that now disagrees with it).
    #[test]
    fn one_hostile_value_is_refused_naming_a_key(n in any::<usize>(), v in value()) {
        let text = apply(&full_config(), &[Edit::Value(n, v)]);
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            assert_located(&text, &e)?;
            let i = e.invalid().expect("located");
            prop_assert!(i.key.is_some() && i.line.is_some(), "{}", e);
        }
    }
}
