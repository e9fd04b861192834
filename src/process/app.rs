//! Start-up, signals, reload and shutdown of the proxy process.
//!
//! Order matters and follows the original where it can: configuration, daemonising (before
//! any thread exists), logging, binding, then the privilege drop (after binding, so a port
//! below 1024 works without capabilities), the pid file, and the accept loop.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::file_watch;
use crate::config::{self, ConfigError, LoadOptions, OutAddress, Settings};
use crate::ops::admin::{self, Health};
use crate::ops::logging::{self, LogTarget};
use crate::ops::telemetry;
use crate::process::cli::RunArgs;
use crate::process::{daemon, privileges};
use crate::proxy::server::{self, BoundListener};
use crate::proxy::tls::Tls;

fn load(args: &RunArgs) -> Result<(Settings, Vec<String>), ConfigError> {
    let loaded = config::load(&LoadOptions {
        config_path: args.config_path.clone(),
        env: std::env::vars().collect(),
        overrides: args.overrides.clone(),
    })?;
    let mut warnings = loaded.warnings;
    if !loaded.file_found {
        // Said at once, like the original: the next error may well be its consequence.
        eprintln!(
            "proxsmtpd: configuration file not found: {}",
            args.config_path.display()
        );
    }
    warnings.extend(config::validate(&loaded.settings)?);
    Ok((loaded.settings, warnings))
}

fn exit_with(e: &ConfigError) -> ExitCode {
    eprintln!("proxsmtpd: {e}");
    ExitCode::from(e.exit_code.clamp(1, 255) as u8)
}

/// A signal mask inherited from whoever started the process (a supervisor blocking signals
/// for its own wait loop, as process 1 does in `init`) would keep SIGTERM and SIGHUP from
/// ever reaching the runtime's handlers, and would be passed on to every filter; a child
/// starts with its parent's mask across exec. Cleared once, before any thread exists.
pub fn clear_inherited_signal_mask() {
    if let Err(e) = nix::sys::signal::SigSet::empty().thread_set_mask() {
        eprintln!("proxsmtpd: couldn't clear the signal mask: {e}");
    }
}

/// Descriptors inherited from whoever started the daemon (without close-on-exec) would
/// reach every filter; the original closed 3..1023 in each child. Closed here, once, before
/// the process opens anything of its own.
pub fn close_inherited_descriptors() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let inherited: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    // The directory's own descriptor is in the list and already closed: EBADF is fine.
    for fd in inherited {
        let _ = nix::unistd::close(fd);
    }
}

/// Descriptors one SMTP session may hold at once: the client and upstream sockets, the
/// spool file, the filter's three pipes and its output file.
const FDS_PER_SESSION: u64 = 7;

/// Descriptors the process needs besides its sessions: listeners, the runtime, logging.
const FDS_BASE: u64 = 32;

/// Raises the soft RLIMIT_NOFILE to the hard limit (a service manager's default soft limit
/// of 1024 is far below what MaxConnections may need); returns the soft limit now in force
/// and what went wrong, if anything.
pub(crate) fn raise_nofile_limit() -> (u64, Option<String>) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return (1024, Some(format!("couldn't read RLIMIT_NOFILE: {e}"))),
    };
    // An unlimited hard limit still stops at the kernel's per-process maximum.
    let target = if hard == RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(soft)
    } else {
        hard
    };
    if soft >= target {
        return (soft, None);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => (target, None),
        Err(e) => (
            soft,
            Some(format!(
                "couldn't raise RLIMIT_NOFILE from {soft} to {target}: {e}"
            )),
        ),
    }
}

/// A warning when `nofile` descriptors cannot cover MaxConnections sessions next to the
/// admin server's share.
fn descriptor_budget_warning(
    nofile: u64,
    max_connections: usize,
    admin_cap: usize,
) -> Option<String> {
    let needed = (max_connections as u64)
        .saturating_mul(FDS_PER_SESSION)
        .saturating_add(admin_cap as u64)
        .saturating_add(FDS_BASE);
    (nofile < needed).then(|| {
        format!(
            "RLIMIT_NOFILE is {nofile}, MaxConnections {max_connections} may need {needed} \
             descriptors: raise the limit (ulimit -n, LimitNOFILE=) or lower MaxConnections"
        )
    })
}

pub fn run(args: RunArgs) -> ExitCode {
    let (nofile, nofile_error) = raise_nofile_limit();
    let (settings, warnings) = match load(&args) {
        Ok(s) => s,
        Err(e) => return exit_with(&e),
    };
    for w in &warnings {
        eprintln!("proxsmtpd: {w}");
    }
    // Before daemonising and the privilege drop: errors reach the terminal, and key files
    // readable only by root can be read.
    let tls = match Tls::from_settings(&settings) {
        Ok(tls) => Arc::new(tls),
        Err(e) => {
            eprintln!("proxsmtpd: TLS: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = crate::proxy::hook::hooks_for(&settings) {
        eprintln!("proxsmtpd: Hooks: {e}");
        return ExitCode::from(1);
    }
    let mut pid_path = args.pid_file.clone();
    if let Some(p) = &settings.pid_file {
        if pid_path.is_some() {
            eprintln!("proxsmtpd: ignoring pid file specified on the command line. ");
        }
        pid_path = Some(p.clone());
    }

    // Bound before daemonising, so a busy port is reported on the terminal (exit 1) and a
    // forking service manager sees the failure; and before the privilege drop, so ports
    // below 1024 need no capability.
    let bound = match Bound::bind(&settings) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("proxsmtpd: {e}");
            return ExitCode::from(1);
        }
    };

    // Under systemd with `Type=notify` (NOTIFY_SOCKET set) the service manager wants the
    // process it started to stay and say READY=1; everywhere else (the original's
    // `Type=forking` units, init scripts, a shell) it forks into the background as before.
    let under_systemd = crate::process::sd_notify::init_from_env();
    let foreground = args.debug_level.is_some() || settings.container || under_systemd;
    if !foreground {
        if let Err(e) = daemon::daemonize() {
            eprintln!("proxsmtpd: couldn't run as daemon: {e}");
            return ExitCode::from(1);
        }
    }
    // After daemonising, so it holds the daemon's pid; before the privilege drop, so it can
    // go where only root writes.
    let mut startup = Startup {
        admin_cap: admin::connection_cap(nofile),
        ..Startup::default()
    };
    startup.warnings.extend(nofile_error);
    startup.warnings.extend(descriptor_budget_warning(
        nofile,
        settings.max_connections,
        startup.admin_cap,
    ));
    if let Some(path) = &pid_path {
        match daemon::PidFile::write(path) {
            Ok(p) => startup.pid_file = Some(p),
            Err(e) => startup
                .errors
                .push(format!("couldn't write pid file: {}: {e}", path.display())),
        }
    }
    // Before the runtime starts: with a single thread the switch (and the capability kept
    // for TransparentProxy full) covers every thread created afterwards.
    if let Some(user) = &settings.user {
        match privileges::drop_to_user(user, settings.transparent == config::Transparent::Full) {
            Ok(warnings) => startup.warnings.extend(warnings),
            Err(e) => {
                eprintln!("proxsmtpd: {e}");
                return ExitCode::from(1);
            }
        }
    } else if let Some(w) = privileges::root_warning_if_root() {
        startup.warnings.push(w);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxsmtpd: couldn't start: {e}");
            return ExitCode::from(1);
        }
    };
    // Logging as without -d (syslog) unless -d or Container says otherwise.
    let to_stderr = foreground && !under_systemd;
    runtime.block_on(serve(args, settings, tls, bound, startup, to_stderr))
}

/// The listening sockets, bound before anything else happens.
struct Bound {
    smtp: BoundListener,
    tls: Option<BoundListener>,
    admin: Option<std::net::TcpListener>,
}

impl Bound {
    fn bind(settings: &Settings) -> Result<Bound, String> {
        let smtp = BoundListener::bind(&settings.listen, settings.transparent)
            .map_err(|e| format!("couldn't bind to address: {:?}: {e}", settings.listen))?;
        let tls = match &settings.tls_listen {
            Some(address) => Some(
                BoundListener::bind(address, settings.transparent)
                    .map_err(|e| format!("couldn't bind to TlsListen address: {address:?}: {e}"))?,
            ),
            None => None,
        };
        let admin = match settings.admin_listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| format!("couldn't bind admin address {addr}: {e}"))?;
                l.set_nonblocking(true)
                    .map_err(|e| format!("admin address {addr}: {e}"))?;
                Some(l)
            }
            None => None,
        };
        Ok(Bound { smtp, tls, admin })
    }
}

/// What happened before logging existed, to be logged once it does.
#[derive(Default)]
struct Startup {
    pid_file: Option<daemon::PidFile>,
    warnings: Vec<String>,
    errors: Vec<String>,
    /// The admin server's connection limit, from the descriptor limit.
    admin_cap: usize,
}

async fn serve(
    args: RunArgs,
    settings: Settings,
    tls: Arc<Tls>,
    bound: Bound,
    startup: Startup,
    to_stderr: bool,
) -> ExitCode {
    let otel = match telemetry::otel_layer::<tracing_subscriber::Registry>() {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("proxsmtpd: OpenTelemetry export disabled: {e}");
            None
        }
    };
    let target = if settings.container || settings.log_format == config::LogFormat::Json {
        LogTarget::Json
    } else if let Some(level) = args.debug_level {
        LogTarget::Stderr { level }
    } else if to_stderr {
        LogTarget::Stderr { level: 2 }
    } else {
        LogTarget::Syslog
    };
    let otel_guard = match otel {
        Some((layer, guard)) => {
            logging::init(target, Some(Box::new(layer)));
            Some(guard)
        }
        None => {
            logging::init(target, None);
            None
        }
    };

    // After daemonising (the attribute is not inherited by a fork): what a filter leaves
    // outside its process group becomes this process's to reap or kill.
    crate::filter::orphans::start_reaping();

    // SIGXFSZ would kill the whole daemon when a spool file reaches a file-size limit; with
    // a handler installed the write fails with EFBIG instead and that message gets a 451.
    match signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGXFSZ as i32,
    )) {
        Ok(mut xfsz) => {
            tokio::spawn(async move { while xfsz.recv().await.is_some() {} });
        }
        Err(e) => tracing::warn!("couldn't handle SIGXFSZ: {e}"),
    }
    for e in &startup.errors {
        tracing::error!("{e}");
    }
    for w in &startup.warnings {
        tracing::warn!("{w}");
    }
    let pid_file = startup.pid_file;
    let admin_cap = startup.admin_cap;
    let into_tokio = |l: BoundListener| {
        l.into_listener().map_err(|e| {
            tracing::error!("couldn't listen: {e}");
            ExitCode::from(1)
        })
    };
    let listener = match into_tokio(bound.smtp) {
        Ok(l) => l,
        Err(code) => return code,
    };
    tracing::info!("listening on {}", listener.local_description());
    let tls_listener = match bound.tls.map(into_tokio).transpose() {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Some(l) = &tls_listener {
        tracing::info!("listening for implicit TLS on {}", l.local_description());
    }

    let admin_listener = match bound
        .admin
        .map(tokio::net::TcpListener::from_std)
        .transpose()
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("couldn't listen on the admin address: {e}");
            return ExitCode::from(1);
        }
    };

    if let Err(w) = check_temp_directory(&settings.temp_directory) {
        tracing::warn!("{w}");
    }

    let drain_timeout = settings.drain_timeout;
    let reload_watch = settings.reload_watch;
    let (settings_tx, settings_rx) = watch::channel(Arc::new(settings));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut health = {
        let rx = settings_rx.clone();
        Health::default().with_filter_check(Arc::new(move || {
            crate::filter::check::filter_ready(&rx.borrow()).is_ok()
        }))
    };
    {
        let settings = settings_rx.borrow();
        if settings.readiness_check_upstream {
            health = health.with_upstream_check(upstream_check(&settings), UPSTREAM_CHECK_TTL);
        }
        if settings.readiness_check_milters && !settings.milters.is_empty() {
            health = health.with_milter_check(milter_check(&settings), UPSTREAM_CHECK_TTL);
        }
        if let Err(e) = crate::filter::check::filter_ready(&settings) {
            tracing::warn!("{e}: not ready until it can run");
        }
        let metrics = crate::ops::metrics::global();
        metrics.set_max_connections(settings.max_connections);
        for milter in &settings.milters {
            metrics.milter_configured(&milter.name);
        }
        metrics.config_loaded();
    }
    let health = Arc::new(health);

    if let Some(l) = admin_listener {
        let health = health.clone();
        // The admin server lives until the process exits, so probes see the drain.
        tokio::spawn(admin::serve(
            l,
            health,
            admin_cap,
            std::future::pending::<()>(),
        ));
    }

    health.set_listener_bound();
    health.set_config_loaded();
    let settings_tx = Arc::new(settings_tx);
    if reload_watch {
        tokio::spawn(watch_files(args.clone(), settings_tx.clone()));
    }
    let ready_status = format!(
        "READY=1\nSTATUS=listening on {}",
        describe_listen(&settings_tx.borrow().listen)
    );
    // Installed here, before READY=1 is sent: a SIGTERM right after it must drain, not kill.
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    tokio::spawn(signals(
        handlers,
        args,
        settings_tx,
        shutdown_tx,
        health.clone(),
    ));
    // Certificates are watched whatever ReloadWatch says: they are rotated behind the
    // proxy's back (cert-manager, a renewed Secret) and an expired one fails every client.
    tokio::spawn(crate::proxy::tls::watch_certificates(
        tls.clone(),
        settings_rx.clone(),
    ));

    // Built now (the process collector reads /proc once) rather than on the first
    // connection's way to its upstream.
    crate::ops::metrics::global();

    // Every listener is bound and listening, the configuration and filter are loaded.
    crate::process::sd_notify::notify(&ready_status);
    crate::process::sd_notify::spawn_watchdog();

    let mut rx = shutdown_rx.clone();
    // On a worker thread rather than this one: a session spawned from a worker starts on
    // that same worker, without waking another thread for every connection.
    let accepting = tokio::spawn(server::run(
        listener,
        tls_listener,
        tls,
        settings_rx,
        drain_timeout,
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        },
    ));
    if let Err(e) = accepting.await {
        tracing::error!("the listener stopped unexpectedly: {e}");
    }

    tracing::info!("stopped");
    if let Some(p) = pid_file {
        if let Err(e) = p.remove() {
            tracing::warn!("couldn't remove pid file: {e}");
        }
    }
    if let Some(guard) = otel_guard {
        guard.shutdown().await;
    }
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT drain and stop; SIGHUP reloads the configuration for new messages.
async fn signals(
    handlers: (
        std::io::Result<tokio::signal::unix::Signal>,
        std::io::Result<tokio::signal::unix::Signal>,
        std::io::Result<tokio::signal::unix::Signal>,
    ),
    args: RunArgs,
    settings_tx: Arc<watch::Sender<Arc<Settings>>>,
    shutdown_tx: watch::Sender<bool>,
    health: Arc<Health>,
) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = handlers else {
        tracing::error!("couldn't install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::process::sd_notify::notify(&crate::process::sd_notify::reloading_message(
                    crate::process::sd_notify::monotonic_now(),
                ));
                reload(&args, &settings_tx).await;
                crate::process::sd_notify::notify("READY=1");
            }
        }
    }
    crate::process::sd_notify::notify("STOPPING=1\nSTATUS=draining sessions");
    tracing::info!("shutting down: draining sessions");
    health.set_draining();
    let _ = shutdown_tx.send(true);
}

/// Applies a changed configuration to new messages; a broken one is refused and the
/// running one stays. Loading and checking it (files, host names) runs off the async
/// workers.
pub(crate) async fn reload(args: &RunArgs, settings_tx: &watch::Sender<Arc<Settings>>) {
    let args = args.clone();
    let loaded = file_watch::off_runtime(move || {
        let (settings, _) = load(&args).map_err(|e| e.to_string())?;
        // A hook whose certificate, key or token cannot be read refuses the reload.
        crate::proxy::hook::hooks_for(&settings).map_err(|e| format!("Hooks: {e}"))?;
        let ready = crate::filter::check::filter_ready(&settings);
        Ok::<_, String>((settings, ready))
    })
    .await;
    match loaded {
        Ok((settings, ready)) => {
            tracing::info!("configuration reloaded");
            if let Err(e) = ready {
                tracing::warn!("{e}: not ready until it can run");
            }
            let metrics = crate::ops::metrics::global();
            metrics.config_reload(true);
            metrics.set_max_connections(settings.max_connections);
            let _ = settings_tx.send(Arc::new(settings));
        }
        Err(e) => {
            tracing::error!("configuration reload refused, keeping the running one: {e}");
            crate::ops::metrics::global().config_reload(false);
        }
    }
}

/// Reloads when the configuration file or the filter script changes on disk (a ConfigMap
/// update swaps a `..data` symlink under them).
async fn watch_files(args: RunArgs, settings_tx: Arc<watch::Sender<Arc<Settings>>>) {
    let watched = |settings: &Settings| {
        let mut paths = vec![args.config_path.clone()];
        if let Some(script) = settings
            .filter_command
            .as_deref()
            .and_then(crate::filter::check::script_path)
        {
            paths.push(script);
        }
        paths
    };
    let paths = watched(&settings_tx.borrow());
    let mut watcher = file_watch::Watcher::watch(paths).await;
    loop {
        tokio::time::sleep(file_watch::POLL_INTERVAL).await;
        if watcher.poll().await {
            tracing::info!("configuration or filter changed on disk");
            reload(&args, &settings_tx).await;
            // The filter script may have moved with the new configuration.
            let paths = watched(&settings_tx.borrow());
            watcher = file_watch::Watcher::watch(paths).await;
        }
    }
}

/// The `Listen` address for the service manager's status line.
fn describe_listen(listen: &config::ListenAddress) -> String {
    match listen {
        config::ListenAddress::Tcp(addr) => addr.to_string(),
        config::ListenAddress::Unix(path) => path.display().to_string(),
    }
}

/// How long a readiness answer about the upstream is reused.
const UPSTREAM_CHECK_TTL: Duration = Duration::from_secs(10);

/// ReadinessCheckUpstream: can a TCP (or unix) connection to the upstream be opened?
fn upstream_check(settings: &Settings) -> admin::UpstreamCheck {
    let target = settings.out_address.clone();
    Arc::new(move || {
        let target = target.clone();
        Box::pin(async move {
            match target {
                Some(OutAddress::Ip(addr)) => tokio::net::TcpStream::connect(addr).await.is_ok(),
                Some(OutAddress::Host { name, port }) => {
                    tokio::net::TcpStream::connect((name.as_str(), port))
                        .await
                        .is_ok()
                }
                Some(OutAddress::ClientLoopback(port)) => {
                    tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                }
                Some(OutAddress::Unix(path)) => tokio::net::UnixStream::connect(path).await.is_ok(),
                // Transparent mode has no single upstream to ask.
                None => true,
            }
        })
    })
}

/// ReadinessCheckMilters: every milter of the configuration at start accepts a
/// connection (and is then left at once, before negotiation).
fn milter_check(settings: &Settings) -> admin::UpstreamCheck {
    use crate::config::milter::MilterAddress;
    let addresses: Vec<MilterAddress> =
        settings.milters.iter().map(|m| m.address.clone()).collect();
    Arc::new(move || {
        let addresses = addresses.clone();
        Box::pin(async move {
            for address in addresses {
                let up = match address {
                    MilterAddress::Tcp { host, port } => {
                        tokio::net::TcpStream::connect((host.as_str(), port))
                            .await
                            .is_ok()
                    }
                    MilterAddress::Unix(path) => {
                        tokio::net::UnixStream::connect(path).await.is_ok()
                    }
                };
                if !up {
                    return false;
                }
            }
            true
        })
    })
}

/// A world-writable TempDirectory without the sticky bit lets other users replace spool
/// files between the filter and delivery.
fn check_temp_directory(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(dir).map_err(|e| format!("TempDirectory {}: {e}", dir.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "TempDirectory {} is world-writable without the sticky bit",
            dir.display()
        ));
    }
    Ok(())
}
