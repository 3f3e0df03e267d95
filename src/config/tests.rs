use super::*;

fn refuse(text: &str) -> Invalid {
    match Config::parse(text, "test.toml") {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e.invalid().expect("located error").clone(),
    }
}

const MINIMAL: &str = r#"
[[pool]]
name = "p"
devices = ["p.img"]
create_size = "8G"

[[volume]]
name = "v"
pool = "p"
size = "1G"
"#;

#[test]
fn embedded_default_parses_and_has_the_documented_values() {
    let c = Config::embedded_default();
    assert_eq!(c.engine.cores, Cores::All);
    assert_eq!(c.engine.poll, PollMode::Adaptive);
    assert_eq!(c.pools.len(), 1);
    assert_eq!(c.pools[0].cluster_size, ByteSize(64 << 10));
    assert_eq!(c.volumes[0].name, "vol0");
    assert_eq!(c.volumes[0].size, ByteSize(4 << 30));
    assert_eq!(c.nbd.listen, Some("127.0.0.1:10809".parse().unwrap()));
    assert_eq!(
        c.control_socket_path(),
        PathBuf::from("tessel-data/tessel.sock")
    );
    assert_eq!(
        c.resolve(&c.pools[0].devices[0]),
        PathBuf::from("tessel-data/pool0.img")
    );
}

#[test]
fn production_example_parses() {
    // Parsed, not loaded: its cores (2-5) need not exist on the machine running the test.
    let c = Config::parse(
        include_str!("../../config/production.toml"),
        "config/production.toml",
    )
    .unwrap();
    assert_eq!(c.engine.poll, PollMode::Busy);
    assert!(matches!(c.engine.cores, Cores::List(_)));
    assert!(c.volumes.len() > 1);
    assert!(c.iscsi.targets.iter().any(|t| t.chap_secret.is_some()));
    assert!(!c.schedules.is_empty());
    assert_eq!(
        c.resolve(Path::new("/dev/nvme0n1")),
        PathBuf::from("/dev/nvme0n1")
    );
}

#[test]
fn minimal_file_takes_defaults_for_the_rest() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.engine, EngineConfig::default());
    assert_eq!(c.volumes[0].block_size, 4096);
    assert_eq!(c.pools[0].format, FormatPolicy::IfEmpty);
    assert_eq!(c.daemon, DaemonConfig::default());
}

#[test]
fn unknown_key_names_the_key_and_its_line() {
    let e = refuse("[engine]\ncores = 2\npol = \"busy\"\n");
    assert_eq!(e.line, Some(3));
    assert_eq!(e.column, Some(1));
    assert_eq!(e.key.as_deref(), Some("engine.pol"));
    assert!(e.message.contains("unknown field `pol`"), "{}", e.message);
    assert!(
        e.message.contains("`poll`"),
        "lists what was expected: {}",
        e.message
    );
    assert!(
        e.to_string()
            .starts_with("test.toml:3:1: key `engine.pol`: "),
        "{e}"
    );
}

#[test]
fn unknown_key_in_an_array_of_tables_names_the_entry() {
    let e = refuse(&format!("{MINIMAL}colour = \"red\"\n"));
    assert_eq!(e.key.as_deref(), Some("volume[0].colour"));
    assert_eq!(e.line, Some(11));
}

#[test]
fn wrong_type_names_the_key_and_the_expected_type() {
    let e = refuse("[engine]\nring_entries = \"lots\"\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.key.as_deref(), Some("engine.ring_entries"));
    assert!(e.message.contains("expected u32"), "{}", e.message);
}

#[test]
fn submit_batch_beyond_the_ring_is_refused() {
    let e = refuse("[engine]\nring_entries = 64\nsubmit_batch = 65\n");
    assert_eq!(e.key.as_deref(), Some("engine.submit_batch"));
    assert_eq!(e.line, Some(3));
    assert!(
        e.message.contains("1 to ring_entries (64)"),
        "{}",
        e.message
    );
    let e = refuse("[engine]\nsubmit_batch = 0\n");
    assert_eq!(e.key.as_deref(), Some("engine.submit_batch"));
}

#[test]
fn bad_size_names_the_key_and_the_unit() {
    let e = refuse(&MINIMAL.replace("size = \"1G\"", "size = \"4Q\""));
    assert_eq!(e.key.as_deref(), Some("volume[0].size"));
    assert_eq!(e.line, Some(10));
    assert!(e.message.contains("unknown unit 'Q'"), "{}", e.message);
}

#[test]
fn bad_enum_value_lists_the_choices() {
    let e = refuse("[engine]\npoll = \"sometimes\"\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.key.as_deref(), Some("engine.poll"));
    assert!(
        e.message.contains("`adaptive`") && e.message.contains("`busy`"),
        "{}",
        e.message
    );
    let e = refuse("[engine]\ncores = \"some\"\n");
    assert!(e.message.contains("\"all\""), "{}", e.message);
}

#[test]
fn syntax_error_has_a_line() {
    let e = refuse("[engine\ncores = 2\n");
    assert_eq!(e.line, Some(1));
}

#[test]
fn volume_in_an_unknown_pool_is_refused_at_its_line() {
    let e = refuse(&MINIMAL.replace("pool = \"p\"", "pool = \"q\""));
    assert_eq!(e.key.as_deref(), Some("volume[0].pool"));
    assert_eq!(e.line, Some(9));
    assert!(e.message.contains("unknown pool 'q'"), "{}", e.message);
}

#[test]
fn duplicate_names_are_refused() {
    let text = format!("{MINIMAL}\n[[volume]]\nname = \"v\"\npool = \"p\"\nsize = \"2G\"\n");
    let e = refuse(&text);
    assert_eq!(e.key.as_deref(), Some("volume[1].name"));
    assert_eq!(e.line, Some(13));
    assert!(e.message.contains("duplicate volume name 'v'"));
}

#[test]
fn block_and_cluster_sizes_are_checked() {
    let e = refuse(&format!("{MINIMAL}block_size = 1024\n"));
    assert_eq!(e.key.as_deref(), Some("volume[0].block_size"));
    assert!(e.message.contains("512 or 4096"));
    for bad in ["\"2K\"", "\"2M\"", "\"96K\""] {
        let e = refuse(&MINIMAL.replace("create_size = \"8G\"", &format!("cluster_size = {bad}")));
        assert_eq!(e.key.as_deref(), Some("pool[0].cluster_size"), "{bad}");
        assert_eq!(e.line, Some(5));
    }
    let e = refuse(&MINIMAL.replace("size = \"1G\"", "size = 1000"));
    assert_eq!(e.key.as_deref(), Some("volume[0].size"));
}

#[test]
fn references_in_exports_schedules_and_targets_are_checked() {
    let e = refuse(&format!("{MINIMAL}\n[[export]]\nvolume = \"w\"\n"));
    assert_eq!(e.key.as_deref(), Some("export[0].volume"));
    assert!(e.message.contains("unknown volume 'w'"));
    let e = refuse(&format!(
        "{MINIMAL}\n[[schedule]]\nvolume = \"v\"\nevery = \"1w\"\nkeep = 3\n"
    ));
    assert_eq!(e.key.as_deref(), Some("schedule[0].every"));
    assert!(e.message.contains("unknown unit 'w'"), "{}", e.message);
    let e = refuse(&format!(
        "{MINIMAL}\n[[iscsi.target]]\nvolume = \"v\"\nchap_user = \"u\"\nchap_secret = \"short\"\n"
    ));
    assert_eq!(e.key.as_deref(), Some("iscsi.target[0].chap_secret"));
    assert!(e.message.contains("12 characters"));
    let e = refuse(&format!(
        "{MINIMAL}\n[[iscsi.target]]\nvolume = \"v\"\nchap_user = \"u\"\n"
    ));
    assert_eq!(e.key.as_deref(), Some("iscsi.target[0].chap_secret"));
}

#[test]
fn iscsi_rules_take_names_and_patterns_of_volumes_not_yet_declared() {
    let c = Config::parse(
        &format!("{MINIMAL}\n[[iscsi.target]]\nvolume = \"db-*\"\n\n[[iscsi.target]]\nvolume = \"later\"\n"),
        "t",
    )
    .unwrap();
    assert_eq!(c.iscsi.targets.len(), 2);
    assert_eq!(c.iscsi.unmatched_policy(), Unmatched::Deny, "rules: deny");
    let open = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(
        open.iscsi.unmatched_policy(),
        Unmatched::Allow,
        "no rule: allow"
    );
    let c = Config::parse(
        &format!("{MINIMAL}\n[iscsi]\nunmatched = \"allow\"\n[[iscsi.target]]\nvolume = \"v\"\n"),
        "t",
    )
    .unwrap();
    assert_eq!(c.iscsi.unmatched_policy(), Unmatched::Allow, "as written");
    for bad in ["db/*", "", "-x", "a b"] {
        let e = refuse(&format!(
            "{MINIMAL}\n[[iscsi.target]]\nvolume = \"{bad}\"\n"
        ));
        assert_eq!(e.key.as_deref(), Some("iscsi.target[0].volume"), "{bad}");
    }
    let e = refuse(&format!("{MINIMAL}\n[iscsi]\nunmatched = \"maybe\"\n"));
    assert_eq!(e.key.as_deref(), Some("iscsi.unmatched"));
}

#[test]
fn listen_addresses_are_checked_and_empty_disables() {
    let c = Config::parse("[nbd]\nlisten = \"\"\n", "t").unwrap();
    assert_eq!(c.nbd.listen, None);
    let e = refuse("[iscsi]\nlisten = \"localhost\"\n");
    assert_eq!(e.key.as_deref(), Some("iscsi.listen"));
    assert!(e.message.contains("IP:PORT"));
}

#[test]
fn engine_values_are_range_checked() {
    assert_eq!(
        refuse("[engine]\nring_entries = 300\n").key.as_deref(),
        Some("engine.ring_entries")
    );
    assert_eq!(
        refuse("[engine]\ncores = [1, 1]\n").key.as_deref(),
        Some("engine.cores")
    );
    assert_eq!(
        refuse("[engine]\ncores = 0\n").key.as_deref(),
        Some("engine.cores")
    );
    assert_eq!(
        refuse("[engine]\nlog_level = \"inf\"\n").key.as_deref(),
        Some("engine.log_level")
    );
    let c = Config::parse("[engine]\ncores = [0, 2]\n", "t").unwrap();
    assert_eq!(c.engine.cores, Cores::List(vec![0, 2]));
    let c = Config::parse("[engine]\nlog_level = \"warn,tessel_engine=debug\"\n", "t").unwrap();
    assert_eq!(c.engine.log_level, "warn,tessel_engine=debug");
}

#[test]
fn cores_this_process_cannot_run_on_and_endless_spins_are_refused() {
    let c = Config::parse("[engine]\ncores = [0, 99]\n", "t").unwrap();
    let e = c.check_host(&[0, 1]).err().unwrap();
    assert_eq!(keys::render(&e.path), "engine.cores");
    assert!(e.message.contains("core 99 is not online"), "{}", e.message);
    assert!(c.check_host(&(0..128).collect::<Vec<_>>()).is_ok());
    let e = refuse("[engine]\nspin_us = 2000000\n");
    assert_eq!(
        (e.key.as_deref(), e.line),
        (Some("engine.spin_us"), Some(2))
    );
}

#[test]
fn names_that_read_as_paths_or_options_are_refused() {
    for name in [".", "..", "-x", ".hidden", "a@b", "a/b", "a b", ""] {
        let text = MINIMAL.replace("name = \"v\"", &format!("name = \"{name}\""));
        let e = refuse(&text);
        assert_eq!(e.key.as_deref(), Some("volume[0].name"), "{name:?}");
        assert!(e.message.contains("not starting with"), "{}", e.message);
    }
}

#[test]
fn limits_are_range_checked_at_their_line() {
    let e = refuse("[limits]\nidle_timeout = \"1h\"\nmemory = \"16M\"\n");
    assert_eq!((e.key.as_deref(), e.line), (Some("limits.memory"), Some(3)));
    assert!(e.message.contains("32M"), "{}", e.message);
    assert_eq!(
        refuse("[limits]\nconnections = 10\nconnections_per_client = 11\n")
            .key
            .as_deref(),
        Some("limits.connections_per_client")
    );
    assert_eq!(
        refuse("[limits]\nhandshake_timeout = \"0s\"\n")
            .key
            .as_deref(),
        Some("limits.handshake_timeout")
    );
    let c = Config::parse("[limits]\nidle_timeout = \"5m\"\n", "t").unwrap();
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
}

#[test]
fn unreadable_file_names_the_path() {
    let e = Config::load("/nonexistent/tessel.toml").unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("/nonexistent/tessel.toml"));
}

#[test]
fn nbd_tls_defaults_to_require_and_exports_may_relax_it() {
    let c = Config::parse(
        &format!(
            "{MINIMAL}\n[nbd.tls]\ncertificate = \"c.pem\"\nkey = \"k.pem\"\n\n\
             [[export]]\nvolume = \"v\"\ntls = \"optional\"\n"
        ),
        "test.toml",
    )
    .unwrap();
    let tls = c.nbd.tls.as_ref().unwrap();
    assert_eq!(tls.default, TlsMode::Require);
    assert_eq!(tls.client_ca, None);
    assert_eq!(c.exports[0].tls, Some(TlsMode::Optional));
    assert_eq!(
        Config::embedded_default().nbd.tls,
        None,
        "no TLS by default"
    );
}

#[test]
fn export_tls_without_nbd_tls_and_unknown_modes_are_refused() {
    let e = refuse(&format!(
        "{MINIMAL}\n[[export]]\nvolume = \"v\"\ntls = \"require\"\n"
    ));
    assert_eq!(e.key.as_deref(), Some("export[0].tls"));
    assert!(e.message.contains("[nbd.tls]"), "{}", e.message);
    let e = refuse(&format!(
        "{MINIMAL}\n[nbd.tls]\ncertificate = \"c\"\nkey = \"k\"\ndefault = \"off\"\n"
    ));
    assert_eq!(e.key.as_deref(), Some("nbd.tls.default"));
    let e = refuse(&format!("{MINIMAL}\n[nbd.tls]\ncertificate = \"c\"\n"));
    assert!(e.message.contains("key"), "{}", e.message);
}
