//! NBD over TLS (NBD_OPT_STARTTLS) through real clients: libnbd's nbdinfo and nbdcopy with
//! `nbds://` URIs and qemu-io with a `tls-creds-x509` object, against a `tessel serve` whose
//! `[nbd.tls]` names certificates made here with `openssl`; and hand-made plain-text and
//! garbage traffic that must never reach a TLS-only export.

#[macro_use]
mod common;

use common::{check, raw_nbd, run, Daemon, TestDir};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// `openssl req` making a P-256 key and a certificate for `subject` in `dir` (`NAME-key.pem`,
/// `NAME-cert.pem`), signed by `ca` (`CA-cert.pem`, `CA-key.pem`) or self-signed as a CA.
fn certificate(dir: &Path, name: &str, subject: &str, ca: Option<&str>, ext: &[&str]) {
    let path = |f: String| dir.join(f).to_str().unwrap().to_string();
    let mut c = Command::new("openssl");
    c.args(["req", "-x509", "-new", "-nodes", "-days", "2"])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
        .args(["-subj", subject])
        .args(["-keyout", &path(format!("{name}-key.pem"))])
        .args(["-out", &path(format!("{name}-cert.pem"))]);
    if let Some(ca) = ca {
        c.args(["-CA", &path(format!("{ca}-cert.pem"))])
            .args(["-CAkey", &path(format!("{ca}-key.pem"))]);
    }
    for e in ext {
        c.args(["-addext", e]);
    }
    check(&mut c);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, another
/// CA's client certificate, and the client directories libnbd and qemu read
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`): `good/` with the right client
/// certificate, `nocert/` with none, `stranger/` with the other CA's.
fn make_certificates(dir: &Path) {
    let ca = [
        "basicConstraints=critical,CA:TRUE",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    let leaf = |eku: &'static str| ["basicConstraints=critical,CA:FALSE", eku];
    certificate(dir, "ca", "/CN=tessel test CA", None, &ca);
    certificate(dir, "other-ca", "/CN=another CA", None, &ca);
    let mut server = leaf("extendedKeyUsage=serverAuth").to_vec();
    server.push("subjectAltName=IP:127.0.0.1,DNS:localhost");
    certificate(dir, "server", "/CN=localhost", Some("ca"), &server);
    let client = leaf("extendedKeyUsage=clientAuth");
    certificate(dir, "client", "/CN=host1", Some("ca"), &client);
    certificate(dir, "stranger", "/CN=host2", Some("other-ca"), &client);
    for (sub, client) in [
        ("good", Some("client")),
        ("nocert", None),
        ("stranger", Some("stranger")),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        if let Some(c) = client {
            std::fs::copy(dir.join(format!("{c}-cert.pem")), d.join("client-cert.pem")).unwrap();
            std::fs::copy(dir.join(format!("{c}-key.pem")), d.join("client-key.pem")).unwrap();
        }
    }
}

/// Two volumes: `vol0` follows `[nbd.tls]`'s default, `open` has its own `tls` when given.
fn config(dir: &Path, client_ca: bool, open_tls: Option<&str>) -> String {
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let mut c = format!(
        r#"
[[pool]]
name = "default"
devices = ["pool0.img"]
create_size = "2G"

[[volume]]
name = "vol0"
pool = "default"
size = "1G"

[[volume]]
name = "open"
pool = "default"
size = "1G"

[limits]
handshake_timeout = "3s"

[nbd.tls]
certificate = "{}"
key = "{}"
"#,
        path("server-cert.pem"),
        path("server-key.pem")
    );
    if client_ca {
        c += &format!("client_ca = \"{}\"\n", path("ca-cert.pem"));
    }
    if let Some(mode) = open_tls {
        c += &format!("\n[[export]]\nvolume = \"open\"\ntls = \"{mode}\"\n");
    }
    c
}

/// Certificates and a daemon serving `config(.., client_ca, open_tls)`.
fn start(label: &str, client_ca: bool, open_tls: Option<&str>) -> (TestDir, Daemon) {
    let dir = TestDir::new(label);
    make_certificates(&dir.path);
    let conf = dir.join("tessel.toml");
    std::fs::write(&conf, config(&dir.path, client_ca, open_tls)).unwrap();
    let d = Daemon::try_start(&dir.join("data"), &["--config", conf.to_str().unwrap()])
        .unwrap_or_else(|log| panic!("tessel serve did not start:\n{log}"));
    (dir, d)
}

/// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR/CERTS`
fn nbds(d: &Daemon, dir: &TestDir, export: &str, certs: &str) -> String {
    let certs = dir.join(certs);
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        d.nbd_port,
        certs.display()
    )
}

/// Send one option with `data`.
fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Read option replies up to the final one: (reply type, data) each.
fn option_replies(s: &mut TcpStream) -> Vec<(u32, Vec<u8>)> {
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).unwrap();
        replies.push((kind, data));
        if kind == REP_ACK || kind & (1 << 31) != 0 {
            return replies;
        }
    }
}

/// Greeted, with the client flags (FIXED_NEWSTYLE | NO_ZEROES) sent.
fn plain_client(d: &Daemon) -> TcpStream {
    let mut s = raw_nbd::greeted(&d.nbd_addr());
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn go_data(export: &str) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

#[test]
fn data_written_over_tls_reads_back_through_libnbd_and_qemu() {
    require!("openssl", "nbdcopy", "qemu-io");
    let (dir, d) = start("tls-data", true, None);
    let data = common::pseudo_random(8 << 20, 7);
    let src = dir.join("in.bin");
    std::fs::write(&src, &data).unwrap();
    check(
        Command::new("nbdcopy")
            .arg(&src)
            .arg(nbds(&d, &dir, "vol0", "good")),
    );
    let out = dir.join("out.bin");
    let uri = nbds(&d, &dir, "vol0", "good");
    check(Command::new("nbdcopy").args([&uri, out.to_str().unwrap()]));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), 1 << 30);
    assert!(
        back[..data.len()] == data[..],
        "data read back over TLS differs"
    );

    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.join("good").display()
    );
    let image = format!(
        "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
        d.nbd_port
    );
    let qemu = |commands: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["--object", &creds, "--image-opts", &image]);
        for cmd in commands {
            c.args(["-c", cmd]);
        }
        let out = check(&mut c);
        assert!(!out.contains("failed"), "{commands:?}: {out}");
    };
    qemu(&["write -P 0xa7 16M 1M", "flush"]);
    qemu(&["read -P 0xa7 16M 1M", "read -P 0 17M 1M"]);
    let log = d.stderr();
    assert!(log.contains("TLS established"), "{log}");
}

#[test]
fn plain_text_clients_never_reach_a_tls_only_export() {
    require!("openssl", "nbdinfo");
    let (dir, mut d) = start("tls-plain", true, Some("optional"));

    let refused = run(Command::new("nbdinfo").arg(d.uri("vol0")));
    assert!(!refused.status.success(), "plain nbdinfo read vol0");
    let listed = check(Command::new("nbdinfo").args(["--list", &d.uri("")]));
    assert!(listed.contains("\"open\""), "{listed}");
    assert!(
        !listed.contains("vol0"),
        "the TLS-only export is listed in plain text: {listed}"
    );
    check(Command::new("nbdinfo").arg(d.uri("open")));
    let listed = check(Command::new("nbdinfo").args(["--list", &nbds(&d, &dir, "", "good")]));
    assert!(
        listed.contains("\"vol0\"") && listed.contains("\"open\""),
        "{listed}"
    );

    // By hand: GO and INFO are refused with NBD_REP_ERR_TLS_REQD and nothing about the
    // export.
    let mut s = plain_client(&d);
    for option in [OPT_GO, OPT_INFO] {
        send_option(&mut s, option, &go_data("vol0"));
        assert_eq!(
            option_replies(&mut s),
            vec![(REP_ERR_TLS_REQD, vec![])],
            "option {option}"
        );
    }
    // NBD_OPT_EXPORT_NAME cannot be refused: the connection closes, no size is sent.
    send_option(&mut s, OPT_EXPORT_NAME, b"vol0");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "{} bytes sent after EXPORT_NAME",
        rest.len()
    );
    assert!(d.healthy());
}

#[test]
fn client_certificates_not_signed_by_client_ca_are_refused() {
    require!("openssl", "nbdinfo");
    let (dir, mut d) = start("tls-mutual", true, None);
    for certs in ["nocert", "stranger"] {
        let out = run(Command::new("nbdinfo").arg(nbds(&d, &dir, "vol0", certs)));
        assert!(
            !out.status.success(),
            "{certs}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    check(Command::new("nbdinfo").arg(nbds(&d, &dir, "vol0", "good")));
    assert!(d.healthy());

    // Without client_ca, TLS encrypts but does not authenticate: any client gets in.
    let (dir, mut d) = start("tls-anyone", false, None);
    check(Command::new("nbdinfo").arg(nbds(&d, &dir, "vol0", "nocert")));
    assert!(d.healthy());
}

#[test]
fn every_export_requiring_tls_refuses_all_plain_text_options() {
    require!("openssl", "nbdinfo");
    let (dir, mut d) = start("tls-forced", true, Some("require"));
    let mut s = plain_client(&d);
    send_option(&mut s, OPT_LIST, &[]);
    assert_eq!(option_replies(&mut s), vec![(REP_ERR_TLS_REQD, vec![])]);
    send_option(&mut s, OPT_GO, &go_data("open"));
    assert_eq!(option_replies(&mut s), vec![(REP_ERR_TLS_REQD, vec![])]);
    assert!(!run(Command::new("nbdinfo").args(["--list", &d.uri("")]))
        .status
        .success());
    check(Command::new("nbdinfo").arg(nbds(&d, &dir, "open", "good")));
    assert!(d.healthy());
}

#[test]
fn a_bad_tls_handshake_closes_only_that_connection() {
    require!("openssl", "nbdinfo");
    let (dir, mut d) = start("tls-garbage", true, None);
    // STARTTLS acknowledged, then garbage instead of a ClientHello.
    let mut s = plain_client(&d);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_replies(&mut s), vec![(REP_ACK, vec![])]);
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let _ = s.write_all(&[0xee; 4096]);
    assert!(raw_nbd::closed_by_peer(&mut s), "garbage handshake");

    // Plain-text options pipelined behind STARTTLS are TLS bytes, never answered as options.
    let mut s = plain_client(&d);
    send_option(&mut s, OPT_STARTTLS, &[]);
    send_option(&mut s, OPT_GO, &go_data("vol0"));
    assert_eq!(option_replies(&mut s), vec![(REP_ACK, vec![])]);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !rest
            .windows(8)
            .any(|w| w == [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]),
        "an option reply after STARTTLS: {rest:?}"
    );

    // A client that stops in the middle of the TLS handshake meets the handshake timeout.
    let mut s = plain_client(&d);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_replies(&mut s), vec![(REP_ACK, vec![])]);
    let started = Instant::now();
    assert!(raw_nbd::closed_by_peer(&mut s), "stalled handshake");
    assert!(started.elapsed() < Duration::from_secs(20));

    check(Command::new("nbdinfo").arg(nbds(&d, &dir, "vol0", "good")));
    assert!(d.healthy(), "{}", d.stderr());
}

#[test]
fn bad_credentials_stop_the_daemon_before_it_touches_the_pool() {
    require!("openssl");
    let dir = TestDir::new("tls-config");
    make_certificates(&dir.path);
    let conf = dir.join("tessel.toml");
    let text = config(&dir.path, true, None);
    for (broken, what) in [
        (
            text.replace("server-key.pem", "client-key.pem"),
            "a key of another certificate",
        ),
        (
            text.replace("server-cert.pem", "missing.pem"),
            "a missing certificate",
        ),
        (
            text.replace("server-cert.pem", "server-key.pem"),
            "a key as the certificate",
        ),
    ] {
        std::fs::write(&conf, &broken).unwrap();
        let err = Daemon::try_start(&dir.join("data"), &["--config", conf.to_str().unwrap()])
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert!(err.contains("nbd.tls"), "{what}: {err}");
        assert!(
            !dir.join("data/pool0.img").exists(),
            "{what}: pool formatted"
        );
    }
}
