//! The control socket's clients: one thread polls the listener and every connected client,
//! and a few workers run the requests, so idle clients cost a buffer each, not a thread.
//!
//! Each client has at most one request in a worker at a time, so its responses come in
//! request order. A request line longer than [`proto::MAX_LINE`] is answered with an error
//! and the client closed, before more of it is buffered. A failing accept (no fd left)
//! pauses accepting with a doubling back-off instead of ending the loop.

use super::conn::Throttle;
use super::control::ControlServer;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessel_targets::control::proto::{self, ControlResponse, ErrorCode};

/// Clients connected at once; more are closed as they arrive.
const MAX_CLIENTS: usize = 1024;
/// Threads running requests; several, because a request may wait (`clone inflate --wait`,
/// a snapshot barrier) while others are served.
const WORKERS: usize = 8;
/// Longest a response write waits for a client that does not read it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between accept attempts while accept fails.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Bytes read from one client per pass.
const READ_CHUNK: usize = 64 << 10;

/// What a worker does for a client.
enum Work {
    /// Run this request line and answer it.
    Line(Vec<u8>),
    /// Send this answer, then close the client.
    Refuse(ControlResponse),
}

struct Job {
    client: u64,
    work: Work,
    stream: UnixStream,
}

/// A worker's report: the client, and whether it stays open.
type Done = (u64, bool);

struct Client {
    stream: UnixStream,
    /// Received bytes not yet taken as a request line.
    buf: Vec<u8>,
    /// A worker holds one of its requests.
    busy: bool,
    /// The client has closed its side (requests already received are still answered).
    eof: bool,
}

/// Serve control clients on `listener` for the life of the process.
pub fn serve(listener: UnixListener, server: Arc<ControlServer>) {
    if let Err(e) = run(listener, server) {
        tracing::error!("control socket: {e}");
    }
}

fn run(listener: UnixListener, server: Arc<ControlServer>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let (mut wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;
    let (jobs, job_rx) = mpsc::channel::<Job>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done) = mpsc::channel::<Done>();
    for i in 0..WORKERS {
        let (server, job_rx, done_tx, wake) = (
            server.clone(),
            job_rx.clone(),
            done_tx.clone(),
            wake_tx.try_clone()?,
        );
        std::thread::Builder::new()
            .name(format!("control-{i}"))
            .spawn(move || work(&server, &job_rx, &done_tx, &wake))?;
    }
    let mut clients: HashMap<u64, Client> = HashMap::new();
    let mut next_id = 0u64;
    let mut paused_until: Option<Instant> = None;
    let mut backoff = Duration::ZERO;
    let mut failures = Throttle::new(Duration::from_secs(5));
    let mut refusals = Throttle::new(Duration::from_secs(5));
    loop {
        let now = Instant::now();
        let listening = paused_until.is_none_or(|t| now >= t);
        if listening {
            paused_until = None;
        }
        let idle: Vec<u64> = clients
            .iter()
            .filter(|(_, c)| !c.busy && !c.eof)
            .map(|(&id, _)| id)
            .collect();
        let mut fds = vec![pollfd(&wake_rx), pollfd(&listener)];
        fds.extend(idle.iter().map(|id| pollfd(&clients[id].stream)));
        if !listening {
            fds[1].fd = -1;
        }
        let timeout = paused_until.map_or(-1, |t| {
            t.saturating_duration_since(now).as_millis() as i32 + 1
        });
        // SAFETY: `fds` is a live, initialised array of `fds.len()` pollfd entries, each
        // naming an fd owned by a value alive across the call (or -1, which poll skips).
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };

        let mut sink = [0u8; 64];
        while matches!(wake_rx.read(&mut sink), Ok(n) if n > 0) {}
        while let Ok((id, keep)) = done.try_recv() {
            if keep {
                if let Some(c) = clients.get_mut(&id) {
                    c.busy = false;
                }
            } else {
                clients.remove(&id);
            }
        }
        if listening && fds[1].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        backoff = Duration::ZERO;
                        if clients.len() >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
                            if let Some(held) = refusals.pass() {
                                tracing::warn!(
                                    "control client refused: {MAX_CLIENTS} clients connected ({held} more not logged)"
                                );
                            }
                            continue;
                        }
                        let client = Client {
                            stream,
                            buf: Vec::new(),
                            busy: false,
                            eof: false,
                        };
                        clients.insert(next_id, client);
                        next_id += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                        paused_until = Some(Instant::now() + backoff);
                        if let Some(held) = failures.pass() {
                            tracing::warn!(
                                "control accept failed: {e}; retrying with back-off ({held} more failures not logged)"
                            );
                        }
                        break;
                    }
                }
            }
        }
        for (k, id) in idle.iter().enumerate() {
            if fds[2 + k].revents != 0 {
                if let Some(c) = clients.get_mut(id) {
                    receive(c);
                }
            }
        }
        clients.retain(|&id, c| dispatch(id, c, &jobs));
    }
}

fn pollfd(fd: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Read what the client sent, stopping once a line is over the limit.
fn receive(c: &mut Client) {
    let mut chunk = [0u8; READ_CHUNK];
    while c.buf.len() <= proto::MAX_LINE {
        match c.stream.read(&mut chunk) {
            Ok(0) => {
                c.eof = true;
                break;
            }
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => {
                c.eof = true;
                break;
            }
        }
    }
}

/// Hand the client's next request line to a worker; false when the client is to go.
fn dispatch(id: u64, c: &mut Client, jobs: &Sender<Job>) -> bool {
    if c.busy {
        return true;
    }
    let work = loop {
        match c.buf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line: Vec<u8> = c.buf.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                break Work::Line(line);
            }
            None if c.buf.len() > proto::MAX_LINE => {
                break Work::Refuse(ControlResponse::error(
                    ErrorCode::BadRequest,
                    format!(
                        "request line longer than {} bytes; closing",
                        proto::MAX_LINE
                    ),
                ))
            }
            None => return !c.eof,
        }
    };
    let Ok(stream) = c.stream.try_clone() else {
        return false;
    };
    let job = Job {
        client: id,
        work,
        stream,
    };
    c.busy = true;
    jobs.send(job).is_ok()
}

/// A worker: run jobs until the poll loop is gone.
fn work(
    server: &ControlServer,
    jobs: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
    wake: &UnixStream,
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let (response, keep) = match job.work {
            Work::Line(line) => (answer(server, &line), true),
            Work::Refuse(response) => (response, false),
        };
        let text = proto::encode_response(&response);
        let sent = write_within(&job.stream, text.as_bytes(), WRITE_TIMEOUT).is_ok();
        if done.send((job.client, keep && sent)).is_err() {
            return;
        }
        let _ = (&*wake).write(&[1]);
    }
}

/// The response to one request line. A panic while running it is answered as an internal
/// error: the server's state is behind locks that recover from poisoning, and the request
/// is not retried.
fn answer(server: &ControlServer, line: &[u8]) -> ControlResponse {
    let Ok(line) = std::str::from_utf8(line) else {
        return ControlResponse::error(ErrorCode::BadRequest, "request line is not UTF-8");
    };
    match proto::decode_request(line) {
        Ok(req) => {
            tracing::debug!(?req, "control request");
            catch_unwind(AssertUnwindSafe(|| server.handle(req))).unwrap_or_else(|_| {
                tracing::error!("control request panicked");
                ControlResponse::error(ErrorCode::Internal, "the request failed inside the daemon")
            })
        }
        Err(response) => response,
    }
}

/// Write all of `bytes` to a non-blocking stream, waiting at most `limit` for room.
fn write_within(mut stream: &UnixStream, mut bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + limit;
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ErrorKind::TimedOut.into());
                }
                let mut fd = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one live pollfd for an fd `stream` keeps open during the call.
                unsafe { libc::poll(&mut fd, 1, left.as_millis() as i32 + 1) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
