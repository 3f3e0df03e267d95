//! The control protocol: JSON lines over a unix socket, one request line answered by one
//! response line (docs/control.md). `proto` holds the messages and their codecs; this module
//! holds the small blocking client the `tessel` admin commands use.

pub mod proto;

#[cfg(test)]
mod fuzz;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use proto::{ControlRequest, ControlResponse, ErrorCode};

/// Why a call to the daemon failed before a response arrived.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens at the socket path (or it cannot be opened).
    Connect { path: PathBuf, source: io::Error },
    /// Sending the request or reading the response failed.
    Io(io::Error),
    /// The daemon closed the connection without answering.
    Closed,
    /// The response line is not a valid response, or longer than [`proto::MAX_LINE`].
    BadResponse(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect { path, source } => {
                write!(
                    f,
                    "cannot reach the daemon at {}: {}",
                    path.display(),
                    describe(source)
                )
            }
            ClientError::Io(e) => write!(f, "lost the connection to the daemon: {}", describe(e)),
            ClientError::Closed => write!(f, "the daemon closed the connection without answering"),
            ClientError::BadResponse(why) => write!(f, "the daemon sent a bad response: {why}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io(source) => Some(source),
            _ => None,
        }
    }
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_string(),
    }
}

/// A connection to the daemon's control socket; calls are answered in order.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the daemon's socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<ControlClient, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(ClientError::Io)?;
        Ok(ControlClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Limits how long a call waits for its response; `None` (the default) waits for ever,
    /// which `clone inflate --wait` needs.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.writer
            .set_read_timeout(timeout)
            .map_err(ClientError::Io)
    }

    /// Sends one request and reads its response. An error response is `Ok`: it is the
    /// daemon's answer; `Err` means no answer arrived.
    pub fn call(&mut self, request: &ControlRequest) -> Result<ControlResponse, ClientError> {
        self.writer
            .write_all(proto::encode_request(request).as_bytes())
            .map_err(ClientError::Io)?;
        let mut line = String::new();
        let limit = proto::MAX_LINE as u64 + 1;
        let read = self
            .reader
            .by_ref()
            .take(limit)
            .read_line(&mut line)
            .map_err(ClientError::Io)?;
        if read == 0 {
            return Err(ClientError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(if read as u64 >= limit {
                ClientError::BadResponse(format!("longer than {} bytes", proto::MAX_LINE))
            } else {
                ClientError::Closed
            });
        }
        proto::decode_response(&line).map_err(|e| ClientError::BadResponse(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn socket_path(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tessel-control-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("tessel.sock")
    }

    /// A daemon stand-in that answers each line with `answer(line)`, then closes.
    fn serve_once(
        path: &Path,
        answer: impl Fn(&str) -> String + Send + 'static,
    ) -> thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                writer.write_all(answer(&line.unwrap()).as_bytes()).unwrap();
            }
        })
    }

    #[test]
    fn client_sends_one_line_and_reads_one_response_per_call() {
        let path = socket_path("calls");
        let server = serve_once(&path, |line| match proto::decode_request(line) {
            Ok(ControlRequest::VolumeInfo { name }) => {
                proto::encode_response(&ControlResponse::error(
                    ErrorCode::UnknownVolume,
                    format!("unknown volume '{name}'"),
                ))
            }
            Ok(_) => proto::encode_response(&ControlResponse::done()),
            Err(bad) => proto::encode_response(&bad),
        });
        let mut client = ControlClient::connect(&path).unwrap();
        assert_eq!(
            client.call(&ControlRequest::Shutdown).unwrap(),
            ControlResponse::done()
        );
        let reply = client
            .call(&ControlRequest::VolumeInfo { name: "x".into() })
            .unwrap();
        assert_eq!(
            reply,
            ControlResponse::Error {
                code: "unknown_volume".into(),
                message: "unknown volume 'x'".into()
            }
        );
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn connecting_to_nothing_names_the_path_and_the_reason() {
        let path = socket_path("nothing");
        let err = match ControlClient::connect(&path) {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot reach the daemon at {}: ", path.display())),
            "{text}"
        );
        assert!(text.ends_with("no such file or directory"), "{text}");
    }

    #[test]
    fn a_daemon_that_hangs_up_or_talks_nonsense_is_an_error() {
        let path = socket_path("hangup");
        let server = serve_once(&path, |_| "this is not json\n".to_string());
        let mut client = ControlClient::connect(&path).unwrap();
        assert!(matches!(
            client.call(&ControlRequest::Stats),
            Err(ClientError::BadResponse(_))
        ));
        drop(client);
        server.join().unwrap();

        let path = socket_path("silent");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || drop(listener.accept().unwrap()));
        let mut client = ControlClient::connect(&path).unwrap();
        server.join().unwrap();
        assert!(matches!(
            client.call(&ControlRequest::Stats),
            Err(ClientError::Closed) | Err(ClientError::Io(_))
        ));
    }
}
