//! Processes under test: the `chatoy` binary and the repository's scripts, a process that can be
//! stopped and started again on its port, commands run to their end, temporary directories that
//! outlive a failing test, and what `/proc` says about a process.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::util::{random_hex, WAIT};

/// The `chatoy` binary under test. Cargo builds it for the `chatoy` package's test binaries
/// into the directory above theirs (`target/<profile>/chatoy` beside `target/<profile>/deps/`);
/// a test binary elsewhere fails here, loudly.
pub fn chatoy_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let binary = exe
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join(format!("chatoy{}", std::env::consts::EXE_SUFFIX)))
            .unwrap_or_else(|| panic!("no target directory above {}", exe.display()));
        assert!(
            binary.is_file(),
            "{} does not exist: run the tests with `cargo test -p chatoy`, which builds it",
            binary.display()
        );
        binary
    })
}

/// The repository's root (scripts, the fuzz corpus, deployment files).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `deploy/local/<name>`: a script that installs, starts and stops a service or a cluster.
pub fn script(name: &str) -> PathBuf {
    repo_root().join("deploy/local").join(name)
}

/// A directory under the system temp dir, removed with everything in it on drop, unless the
/// test is failing: then it is kept (and named on stderr) for its logs.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a directory with a random name.
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("chatoy-e2e-{}", random_hex(16)));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> TempDir {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs and data of the failed test kept in {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Waits (at most `limit`) for `child` to exit, without blocking the runtime; past the limit it
/// kills the child and fails the test.
pub async fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?} (killed)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a command to its end (at most `limit`) with stdout and stderr written to `log`;
/// returns its exit status and everything it wrote.
pub async fn run_command(
    command: &mut Command,
    log: &Path,
    limit: Duration,
    what: &str,
) -> (ExitStatus, String) {
    let out = fs::File::create(log).expect("create command log");
    let err = out.try_clone().expect("clone command log");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
    let status = wait_exit(&mut child, limit, what).await;
    let output = fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    (status, output)
}

/// Runs a command to its end like [`run_command`] and fails the test unless it succeeds;
/// returns everything it wrote.
pub async fn run_checked(command: &mut Command, log: &Path, limit: Duration, what: &str) -> String {
    let (status, output) = run_command(command, log, limit, what).await;
    assert!(status.success(), "{what} failed ({status}):\n{output}");
    output
}

/// Removes every inherited `CHATOY_*` variable but the log level, so only explicit flags count.
pub fn scrub_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CHATOY_") && key != "CHATOY_LOG" {
            command.env_remove(key);
        }
    }
}

/// One `chatoy` process (`standalone`, `gateway` or `router`) that can be stopped and started
/// again with the same arguments; it listens on `--listen 127.0.0.1:PORT` and its stderr goes
/// to a log file that every incarnation appends to.
pub struct Process {
    name: String,
    /// Every argument but `--listen`, subcommand first.
    args: Vec<String>,
    /// The port of the last start (0 before the first).
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// A process that is not started yet.
    pub fn new(name: &str, args: Vec<String>, log: PathBuf) -> Process {
        Process {
            name: name.to_owned(),
            args,
            port: 0,
            child: None,
            log,
        }
    }

    /// Starts the process and waits (at most `limit`) for its first stdout line, which must be
    /// `ready` followed by the port. It listens on its previous port if that is still free, so a
    /// restart keeps its address; otherwise on a new one.
    pub async fn start(&mut self, ready: &str, limit: Duration) {
        // A process that died by itself is started again like a stopped one.
        if let Some(child) = self.child.as_mut() {
            let exited = child.try_wait().expect("try_wait").is_some();
            assert!(exited, "{} is already running", self.name);
            self.child = None;
        }
        if self.port != 0 && self.try_start(self.port, ready, limit).await.is_ok() {
            return;
        }
        if let Err(why) = self.try_start(0, ready, limit).await {
            panic!("{why}; stderr of {}:\n{}", self.name, self.stderr());
        }
    }

    async fn try_start(&mut self, port: u16, ready: &str, limit: Duration) -> Result<(), String> {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open stderr log");
        let mut command = Command::new(chatoy_binary());
        command
            .args(&self.args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        scrub_env(&mut command);
        let mut child = command.spawn().expect("spawn chatoy");
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = oneshot::channel::<String>();
        // Every stdout line also goes to the log, so the log is the process's whole output.
        let mut tee = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open stderr log");
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(tee, "{line}");
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match tokio::time::timeout(limit, ready_rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => {
                let _ = wait_exit(&mut child, WAIT, &self.name).await;
                return Err(format!(
                    "{} exited before printing its ready line (on port {port})",
                    self.name
                ));
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} printed no ready line within {limit:?}", self.name));
            }
        };
        self.child = Some(child);
        self.port = line
            .strip_prefix(ready)
            .and_then(|port| port.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line of {}: {line:?}", self.name));
        Ok(())
    }

    /// The name used in logs and errors (`gateway-2`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port it listens on (or last listened on).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it was started and not stopped through this handle since.
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Everything every incarnation wrote to stderr (and to stdout).
    pub fn stderr(&self) -> String {
        fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most `limit`) for the process to exit.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.name);
        let what = format!("{} after SIGTERM", self.name);
        let status = wait_exit(child, limit, &what).await;
        self.child = None;
        status
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the running process.
    pub fn signal(&self, signal: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub async fn kill(&mut self) {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        child.kill().expect("SIGKILL");
        wait_exit(child, WAIT, &self.name).await;
        self.child = None;
    }

    /// Kills the process if it runs, blocking (for `Drop`).
    pub fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// The process listening on TCP `port` of 127.0.0.1 (from `/proc/net/tcp` and the processes'
/// socket descriptors).
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let wanted = format!(":{port:04X}");
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address, st (0A = LISTEN), inode.
        let listening = fields.get(3) == Some(&"0A");
        (listening && fields.get(1)?.ends_with(&wanted)).then(|| fields.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// A process's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`); `None` once the
/// process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok());
    Some(rss.unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status")))
}

/// A process's peak resident set size while a test does something: sampled on a task of its
/// own from [`PeakRss::start`] until [`PeakRss::stop`].
pub struct PeakRss {
    pid: u32,
    before: u64,
    peak: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
    sampler: JoinHandle<()>,
}

impl PeakRss {
    /// Starts sampling `pid`, which must run, every `every`.
    pub fn start(pid: u32, every: Duration) -> PeakRss {
        let before = rss_kib(pid).expect("the process runs");
        let peak = Arc::new(AtomicU64::new(before));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn({
            let (peak, sampling) = (peak.clone(), sampling.clone());
            async move {
                // The process outlives the sampling unless the test failed already.
                while sampling.load(Ordering::SeqCst) {
                    let Some(rss) = rss_kib(pid) else { return };
                    peak.fetch_max(rss, Ordering::SeqCst);
                    tokio::time::sleep(every).await;
                }
            }
        });
        PeakRss {
            pid,
            before,
            peak,
            sampling,
            sampler,
        }
    }

    /// The resident set size in KiB when the sampling started.
    pub fn before(&self) -> u64 {
        self.before
    }

    /// Stops sampling, takes a last sample (the process must still run) and returns the peak
    /// in KiB.
    pub async fn stop(self) -> u64 {
        self.sampling.store(false, Ordering::SeqCst);
        self.sampler.await.expect("the RSS sampler");
        let last = rss_kib(self.pid).expect("the process runs");
        self.peak.fetch_max(last, Ordering::SeqCst).max(last)
    }
}
