//! `tessel serve`: open (or format) the pool, make the configured volumes exist, start the
//! NBD target and the control socket, and run until SIGTERM/SIGINT or a shutdown request.

pub mod clients;
pub mod conn;
pub mod control;
pub mod exports;
pub mod origins;
pub mod schedule;
pub mod tls;

use crate::config::{Config, Cores, FormatPolicy, PollMode, Unmatched};
use conn::{Described, Limits, Registry, Session, VolumeUse};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tessel_engine::{Completion, DeviceSpec, Engine, EngineConfig, FormatOptions, PoolError};
use tessel_targets::budget::{Allowance, MemoryBudget};
use tessel_targets::export::{Actions, Exports};
use tessel_targets::iscsi::{self, ChapCredentials, IscsiConfig, IscsiSession, TargetAccess};
use tessel_targets::nbd::{NbdConfig, NbdSession};

impl Session for IscsiSession {
    const PROTOCOL: &'static str = "iscsi";
    fn receive(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<usize, String> {
        IscsiSession::receive(self, input, exports, actions).map_err(|e| e.to_string())
    }
    fn complete(&mut self, c: Completion, actions: &mut Actions) {
        IscsiSession::complete(self, c, actions)
    }
    fn tick(&mut self, now: std::time::Instant, actions: &mut Actions) -> Result<(), String> {
        IscsiSession::tick(self, now, actions).map_err(|e| e.to_string())
    }
    fn shut_down(&mut self, actions: &mut Actions) {
        IscsiSession::shut_down(self, actions)
    }
    fn handshaking(&self) -> bool {
        matches!(self.state(), iscsi::State::Login(_))
    }
    fn volume_use(&self) -> VolumeUse {
        self.target()
            .map_or(VolumeUse::None, |(_, volume)| VolumeUse::Target(volume))
    }
    fn describe(&self) -> Described {
        Described {
            export: None,
            initiator: Some(self.initiator().to_string()).filter(|i| !i.is_empty()),
            target: self.target().map(|(t, _)| t.to_string()),
        }
    }
    fn waiting_for_memory(&self) -> bool {
        IscsiSession::waiting_for_memory(self)
    }
    fn queued(&mut self, bytes: usize) {
        IscsiSession::queued(self, bytes)
    }
}

/// The iSCSI target's settings from `[iscsi]`.
fn iscsi_config(c: &Config, portal: std::net::SocketAddr) -> IscsiConfig {
    let creds = |u: &Option<String>, s: &Option<String>| match (u, s) {
        (Some(user), Some(secret)) => Some(ChapCredentials {
            user: user.clone(),
            secret: secret.clone(),
        }),
        _ => None,
    };
    IscsiConfig {
        iqn_prefix: c.iscsi.iqn_prefix.clone(),
        portal: portal.to_string(),
        targets: c
            .iscsi
            .targets
            .iter()
            .map(|t| TargetAccess {
                volume: t.volume.clone(),
                allowed_initiators: t.allowed_initiators.clone(),
                chap: creds(&t.chap_user, &t.chap_secret),
                mutual_chap: creds(&t.mutual_user, &t.mutual_secret),
            })
            .collect(),
        unmatched: match c.iscsi.unmatched_policy() {
            Unmatched::Allow => iscsi::Unmatched::Allow,
            Unmatched::Deny => iscsi::Unmatched::Deny,
        },
        ..IscsiConfig::default()
    }
}

impl Session for NbdSession {
    const PROTOCOL: &'static str = "nbd";
    fn receive(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<usize, String> {
        NbdSession::receive(self, input, exports, actions).map_err(|e| e.to_string())
    }
    fn complete(&mut self, c: Completion, actions: &mut Actions) {
        NbdSession::complete(self, c, actions)
    }
    fn shut_down(&mut self, _actions: &mut Actions) {
        NbdSession::shut_down(self)
    }
    fn handshaking(&self) -> bool {
        NbdSession::handshaking(self)
    }
    fn volume_use(&self) -> VolumeUse {
        self.volume().map_or(VolumeUse::None, VolumeUse::One)
    }
    fn describe(&self) -> Described {
        Described {
            export: self.export_name().map(str::to_string),
            ..Described::default()
        }
    }
    fn waiting_for_memory(&self) -> bool {
        NbdSession::waiting_for_memory(self)
    }
    fn queued(&mut self, bytes: usize) {
        NbdSession::queued(self, bytes)
    }
}

/// Block SIGINT, SIGTERM, SIGHUP and SIGUSR1 in this thread and every thread it starts;
/// the signal thread receives them. SIGHUP and SIGUSR1, whose default action would kill
/// the daemon without a clean shutdown, are logged and ignored: nothing is reloaded.
fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        set.add(sig);
    }
    let _ = set.thread_block();
    set
}

fn engine_config(c: &Config) -> EngineConfig {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = match &c.engine.cores {
        Cores::All => (0..online).collect(),
        Cores::Count(n) => (0..*n).collect(),
        Cores::List(l) => l.clone(),
    };
    EngineConfig {
        cores,
        poll: match c.engine.poll {
            PollMode::Adaptive => tessel_engine::PollMode::Adaptive,
            PollMode::Busy => tessel_engine::PollMode::Busy,
        },
        ring_entries: c.engine.ring_entries,
        spin: Duration::from_micros(c.engine.spin_us),
        pin: true,
        submit_batch: c.engine.submit_batch,
    }
}

/// Open the configured pool, formatting empty devices when the policy allows it.
fn open_pool(config: &Config) -> Result<Engine, Box<dyn std::error::Error>> {
    let pool = match config.pools.as_slice() {
        [p] => p,
        [] => return Err("the configuration declares no [[pool]]".into()),
        _ => {
            return Err(
                "this build serves one [[pool]] per daemon; start one daemon per pool".into(),
            )
        }
    };
    let devices: Vec<DeviceSpec> = pool
        .devices
        .iter()
        .map(|d| DeviceSpec::Path {
            path: config.resolve(d),
            create_size: pool.create_size.map(|s| s.0),
        })
        .collect();
    let ecfg = engine_config(config);
    match Engine::open(&devices, ecfg.clone()) {
        Ok(e) => Ok(e),
        Err(PoolError::NotAPool { device }) if pool.format == FormatPolicy::IfEmpty => {
            tracing::info!(device = %device.display(), pool = %pool.name, "no pool found; formatting");
            let opts = FormatOptions {
                cluster_size: pool.cluster_size.0 as u32,
                journal_regions: (ecfg.cores.len() as u32).max(16),
                ..FormatOptions::default()
            };
            Engine::format(&devices, &opts)?;
            Ok(Engine::open(&devices, ecfg)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Create the data directory (and missing parents) with mode 0700 whatever the umask: it
/// holds the pool files and the control socket, which no other user may open.
fn create_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Run the daemon with a resolved configuration.
pub fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let signals = block_signals();
    create_data_dir(&config.daemon.data_dir)
        .map_err(|e| format!("{}: {e}", config.daemon.data_dir.display()))?;
    // Every check that can refuse to start runs before the pool is opened or formatted:
    // a daemon pointed at another's socket, or at a busy port, leaves no pool behind.
    let sock = config.control_socket_path();
    let (control_listener, _socket_file) =
        control::bind(&sock).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
    let nbd_listener = match config.nbd.listen {
        Some(addr) => Some((
            TcpListener::bind(addr).map_err(|e| format!("NBD listen on {addr}: {e}"))?,
            addr,
        )),
        None => None,
    };
    let nbd_tls = match &config.nbd.tls {
        Some(t) => Some((tls::credentials(&config, t)?, tls::policy(&config, t))),
        None => None,
    };
    let iscsi_listener = match config.iscsi.listen {
        Some(addr) => Some((
            TcpListener::bind(addr).map_err(|e| format!("iSCSI listen on {addr}: {e}"))?,
            addr,
        )),
        None => None,
    };
    let engine = open_pool(&config)?;
    for v in &config.volumes {
        match engine.volume(&v.name) {
            Some(existing) if existing.size != v.size.0 => tracing::warn!(
                volume = %v.name,
                configured = v.size.0,
                actual = existing.size,
                "volume exists with another size; leaving it as it is"
            ),
            Some(_) => {}
            None => {
                engine.create_volume(&v.name, v.size.0, v.block_size)?;
            }
        }
    }
    let (tx, rx) = mpsc::channel::<&'static str>();
    let stop = Arc::new(AtomicBool::new(false));
    let origins_path = config.resolve(Path::new(origins::FILE));
    let origins = origins::Origins::open(&origins_path, &engine)
        .map_err(|e| format!("{}: {e}", origins_path.display()))?;
    let engine_exports = Arc::new(exports::EngineExports::new(
        engine.clone(),
        Arc::new(origins),
    ));
    for x in &config.exports {
        let name = x.name();
        if x.snapshot.is_some() && !engine_exports.add(&name) {
            tracing::warn!(export = %name, "configured export names no existing snapshot; skipped");
        }
    }
    let exports: Arc<dyn Exports + Send + Sync> = engine_exports.clone();
    let limits = &config.limits;
    let registry = Registry::new(Limits {
        connections: limits.connections,
        connections_per_client: limits.connections_per_client,
        handshake_timeout: limits.handshake_timeout,
        idle_timeout: Some(limits.idle_timeout).filter(|d| !d.is_zero()),
    });
    let budget = MemoryBudget::new(limits.memory.0);
    let connection_memory = limits.connection_memory.0;
    let nbd_config = NbdConfig {
        require_block_size: config.nbd.require_block_size,
        // A request larger than the whole budget could never be held: refused instead.
        max_unnegotiated: u32::try_from(limits.memory.0).unwrap_or(u32::MAX),
        ..NbdConfig::default()
    };
    let configured: Vec<(String, u64, u32)> = config
        .schedules
        .iter()
        .map(|s| (s.volume.clone(), s.every.as_secs(), s.keep))
        .collect();
    let schedules = schedule::Schedules::open(
        engine.clone(),
        &configured,
        &config.daemon.data_dir.join(schedule::FILE),
    )?;
    {
        let (s, stop) = (schedules.clone(), stop.clone());
        std::thread::Builder::new()
            .name("schedules".into())
            .spawn(move || s.run(stop))?;
    }

    let mut listeners = Vec::new();
    if let Some((l, addr)) = nbd_listener {
        tracing::info!(%addr, "NBD target listening");
        listeners.push(addr);
        let (engine, exports, stop, registry, budget) = (
            engine.clone(),
            exports.clone(),
            stop.clone(),
            registry.clone(),
            budget.clone(),
        );
        let (credentials, policy) = nbd_tls.unzip();
        let nbd_config = NbdConfig {
            tls: policy.map(Arc::new),
            ..nbd_config
        };
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                conn::accept_loop(l, engine, exports, stop, registry, credentials, move || {
                    let mut a = Actions::default();
                    let allowance = Allowance::new(budget.clone(), connection_memory);
                    let s = NbdSession::new(nbd_config.clone(), &mut a).with_allowance(allowance);
                    (s, a)
                })
            })?;
    }
    if let Some((l, addr)) = iscsi_listener {
        tracing::info!(%addr, prefix = %config.iscsi.iqn_prefix, "iSCSI portal listening");
        if !addr.ip().is_loopback() && config.iscsi.unmatched_policy() == Unmatched::Allow {
            tracing::warn!(
                %addr,
                "volumes no [[iscsi.target]] covers are open to any initiator on this network \
                 (set iscsi.unmatched = \"deny\" or add rules)"
            );
        }
        listeners.push(addr);
        let icfg = Arc::new(iscsi_config(&config, addr));
        let (engine, exports, stop, registry, budget) = (
            engine.clone(),
            exports.clone(),
            stop.clone(),
            registry.clone(),
            budget.clone(),
        );
        std::thread::Builder::new()
            .name("iscsi-accept".into())
            .spawn(move || {
                conn::accept_loop(l, engine, exports, stop, registry, None, move || {
                    let allowance = Allowance::new(budget.clone(), connection_memory);
                    let s = IscsiSession::new(icfg.clone()).with_allowance(allowance);
                    (s, Actions::default())
                })
            })?;
    }

    tracing::info!(socket = %sock.display(), "control socket listening");
    let server = Arc::new(control::ControlServer::new(
        engine.clone(),
        engine_exports.clone(),
        schedules.clone(),
        registry.clone(),
        tx.clone(),
    ));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || clients::serve(control_listener, server))?;

    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            use nix::sys::signal::Signal;
            while let Ok(sig) = signals.wait() {
                let why = match sig {
                    Signal::SIGINT => "SIGINT",
                    Signal::SIGTERM => "SIGTERM",
                    other => {
                        tracing::info!(signal = %other, "signal ignored (the daemon reloads nothing)");
                        continue;
                    }
                };
                let _ = tx.send(why);
                break;
            }
        })?;
    tracing::info!("tessel is ready");
    let why = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(why) => break why,
            Err(mpsc::RecvTimeoutError::Disconnected) => break "channel closed",
            Err(mpsc::RecvTimeoutError::Timeout) if engine.reactor_panicked() => {
                // Its shards have no owner: nothing can be flushed or checkpointed through
                // it. Stop now; what hosts saw flushed is in the journal, replayed at start.
                tracing::error!("a reactor thread panicked; stopping without a final checkpoint");
                stop.store(true, Ordering::Release);
                return Err("a reactor thread panicked (see the log above)".into());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    tracing::info!(reason = why, "shutting down");
    stop.store(true, Ordering::Release);
    // Wake the accept loops so they see the stop flag.
    for addr in listeners {
        let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200));
    }
    engine.shutdown()?;
    tracing::info!("stopped cleanly");
    Ok(())
}
