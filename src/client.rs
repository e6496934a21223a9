//! `chatoy client`: the terminal client, for scripts and quick checks, and the reference client
//! of docs/client-guide.md. It speaks only the public protocol (docs/PROTOCOL.md): the HTTP API
//! for accounts, rooms and history, and one WebSocket per command for `auth`, `msg` → `send`
//! and `recv`. `send` waits for the ack and resends the same uuid after codes 4 and 5 or a lost
//! connection; `tail` reconnects with jittered backoff and a per-room `since` (its room: the
//! last `sent` it printed), and prints every message once (de-duplicated by uuid).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chatoy_protocol::http::{CodeMsg, Credentials, LoginReply, NewRoom, Room, RoomId, User};
use chatoy_protocol::{
    AuthCode, ClientFrame, Message, MessageContent, SendCode, ServerFrame, Since, Timestamp,
};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long connecting, authenticating or one HTTP call may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(15);

/// How many uuids `tail` remembers for de-duplication.
const SEEN_CAPACITY: usize = 100_000;

/// Flags of `chatoy client`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClientArgs {
    /// The server (any gateway, or the load balancer in front of them).
    #[arg(
        long,
        env = "CHATOY_URL",
        default_value = "http://127.0.0.1:8080",
        global = true,
        value_name = "URL"
    )]
    url: String,
    /// Where `login` saves the token and other commands read it
    /// [default: $XDG_CONFIG_HOME/chatoy/token or ~/.config/chatoy/token].
    #[arg(long, env = "CHATOY_TOKEN_FILE", global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The token to use instead of the token file (best given as the environment variable).
    #[arg(long, env = "CHATOY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Debug, Clone, Subcommand)]
enum ClientCommand {
    /// Creates an account. The password is $CHATOY_PASSWORD, else the first line of stdin.
    Register {
        /// 3–32 of [A-Za-z0-9_.-].
        username: String,
    },
    /// Logs in and saves the token (or prints it with --print). Password as for `register`.
    Login {
        /// The account.
        username: String,
        /// Print the token on stdout instead of saving it.
        #[arg(long)]
        print: bool,
    },
    /// Revokes the token and forgets it.
    Logout,
    /// Lists the rooms you joined: id, tab, name.
    Rooms,
    /// Creates a room (you join it) and prints its id.
    Create {
        /// The room's name.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Joins a room.
    Join {
        /// The room's id.
        room: u64,
    },
    /// Sends a message and waits until the server stored it; prints its uuid and `sent`.
    /// Without TEXT (or with `-`), sends each line of stdin as one message, in order.
    Send {
        /// The room's id.
        room: u64,
        /// The text (words are joined by spaces).
        text: Vec<String>,
        /// The message's uuid (only with one message): running the same command again with the
        /// same uuid never stores it twice.
        #[arg(long)]
        uuid: Option<String>,
        /// Give up (exit status 1) if a message is not stored within this time.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Prints a room's recent history, then its new messages as they come, until interrupted.
    Tail {
        /// The room's id.
        room: u64,
        /// Recent messages to print first.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=200))]
        history: u16,
        /// Print the messages after this RFC 3339 time instead of the recent history.
        #[arg(long, value_parser = parse_timestamp)]
        since: Option<Timestamp>,
        /// Exit after printing this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON `Message` per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_timestamp(text: &str) -> Result<Timestamp, String> {
    Timestamp::parse(text).ok_or_else(|| "expected an RFC 3339 timestamp".to_owned())
}

/// Runs one client command.
pub(crate) async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let http = Http::new(&args.url)?;
    match &args.command {
        ClientCommand::Register { username } => {
            let password = password()?;
            let body = Credentials {
                username: username.clone(),
                password,
            };
            http.call::<CodeMsg>(reqwest::Method::POST, "/users", None, Some(&body))
                .await?;
            println!("registered {username}");
        }
        ClientCommand::Login { username, print } => {
            let password = password()?;
            let body = Credentials {
                username: username.clone(),
                password,
            };
            let reply: LoginReply = http
                .call(reqwest::Method::POST, "/login", None, Some(&body))
                .await?;
            let user = reply.user.context("the login answer names no user")?;
            if *print {
                println!("{}", reply.msg);
            } else {
                let path = token_path(&args)?;
                save_token(&path, &reply.msg)?;
                println!(
                    "logged in as {} (user {}); token saved in {}",
                    user.username,
                    user.id,
                    path.display()
                );
            }
        }
        ClientCommand::Logout => {
            let token = token(&args)?;
            http.call::<CodeMsg>(reqwest::Method::POST, "/logout", Some(&token), None::<&()>)
                .await?;
            if args.token.is_none() {
                let path = token_path(&args)?;
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
            println!("logged out");
        }
        ClientCommand::Rooms => {
            let token = token(&args)?;
            let rooms: Vec<Room> = http
                .call(reqwest::Method::GET, "/rooms/me", Some(&token), None::<&()>)
                .await?;
            for room in rooms {
                println!("{}\t{}", room.id, room.name);
            }
        }
        ClientCommand::Create { name, description } => {
            let token = token(&args)?;
            let body = NewRoom {
                name: name.clone(),
                description: description.clone(),
            };
            let room: RoomId = http
                .call(reqwest::Method::POST, "/rooms", Some(&token), Some(&body))
                .await?;
            println!("{}", room.id);
        }
        ClientCommand::Join { room } => {
            let token = token(&args)?;
            let path = format!("/rooms/{room}/join");
            http.call::<CodeMsg>(reqwest::Method::POST, &path, Some(&token), None::<&()>)
                .await?;
            println!("joined room {room}");
        }
        ClientCommand::Send {
            room,
            text,
            uuid,
            timeout,
        } => {
            let token = token(&args)?;
            let texts = if text.is_empty() || text == &["-"] {
                let stdin = std::io::stdin();
                let mut lines = Vec::new();
                for line in stdin.lock().lines() {
                    let line = line.context("cannot read stdin")?;
                    if !line.is_empty() {
                        lines.push(line);
                    }
                }
                lines
            } else {
                vec![text.join(" ")]
            };
            if uuid.is_some() && texts.len() != 1 {
                bail!("--uuid names one message, but there are {}", texts.len());
            }
            let messages = texts
                .into_iter()
                .map(|text| {
                    (
                        uuid.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                        text,
                    )
                })
                .collect();
            send(&http, &token, *room, messages, *timeout).await?;
        }
        ClientCommand::Tail {
            room,
            history,
            since,
            count,
            json,
        } => {
            let token = token(&args)?;
            let tail = Tail {
                http: &http,
                token: &token,
                room: *room,
                json: *json,
                count: *count,
                printed: 0,
                seen: Seen::default(),
                last: *since,
                names: HashMap::new(),
            };
            tail.run(*history).await?;
        }
    }
    Ok(())
}

/// The password: `$CHATOY_PASSWORD`, else, on a terminal, typed at a prompt without echo, else
/// the first line of stdin (for scripts).
fn password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("CHATOY_PASSWORD") {
        return Ok(password);
    }
    let line = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Password: ").context("cannot read the password")?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        line
    };
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password: set CHATOY_PASSWORD or give it on stdin");
    }
    Ok(password)
}

fn token_path(args: &ClientArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.token_file {
        return Ok(path.clone());
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
        .context("neither XDG_CONFIG_HOME nor HOME is set: give --token-file")?;
    Ok(config.join("chatoy").join("token"))
}

/// Writes the token readable by its owner only.
fn save_token(path: &Path, token: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{token}").with_context(|| format!("cannot write {}", path.display()))
}

fn token(args: &ClientArgs) -> anyhow::Result<String> {
    if let Some(token) = args.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(token.to_owned());
    }
    let path = token_path(args)?;
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => bail!("{} is empty: run `chatoy client login NAME`", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            bail!("not logged in: run `chatoy client login NAME` or set CHATOY_TOKEN")
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The HTTP API of one server.
struct Http {
    base: String,
    ws_url: String,
    client: reqwest::Client,
}

impl Http {
    fn new(url: &str) -> anyhow::Result<Http> {
        let base = url.trim_end_matches('/').to_owned();
        let ws_url = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}/ws")
        } else if base.starts_with("https://") {
            bail!("this client speaks plain HTTP only; put TLS in a local proxy (got {base})");
        } else {
            bail!("--url must start with http:// (got {base})");
        };
        let client = reqwest::Client::builder()
            .timeout(NETWORK_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Http { base, ws_url, client })
    }

    /// One API call; a non-2xx answer becomes an error carrying the server's `msg`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl serde::Serialize>,
    ) -> anyhow::Result<T> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}: cannot reach {}", self.base))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{method} {path}: cannot read the answer"))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<CodeMsg>(&bytes)
                .map(|body| body.msg)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{method} {path}: {status}: {msg}");
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: unexpected answer"))
    }

    async fn history(&self, token: &str, room: u64, limit: u16) -> anyhow::Result<Vec<Message>> {
        let path = format!("/rooms/{room}/messages?limit={limit}");
        self.call(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection attempt or a connection ended.
#[derive(Debug)]
enum Failure {
    /// Retrying cannot help (the token is refused): give up.
    Fatal(anyhow::Error),
    /// The connection failed or was closed (with this close code, if any): reconnect.
    Lost(anyhow::Error, Option<u16>),
}

fn lost(err: impl Into<anyhow::Error>) -> Failure {
    Failure::Lost(err.into(), None)
}

/// Connects, authenticates (with `since`, if any) and returns the socket, ready for traffic.
async fn connect(http: &Http, token: &str, since: Option<Since>) -> Result<Socket, Failure> {
    let connecting = tokio_tungstenite::connect_async(http.ws_url.as_str());
    let (mut socket, _) = tokio::time::timeout(NETWORK_TIMEOUT, connecting)
        .await
        .map_err(|_| lost(anyhow!("connecting to {} timed out", http.ws_url)))?
        .map_err(|err| lost(anyhow!("cannot connect to {}: {err}", http.ws_url)))?;
    let auth = ClientFrame::Auth {
        token: token.to_owned(),
        since,
    };
    write_frame(&mut socket, &auth).await?;
    let answer = tokio::time::timeout(NETWORK_TIMEOUT, async {
        loop {
            if let ServerFrame::Auth { code, msg } = next_frame(&mut socket).await? {
                return Ok((code, msg));
            }
        }
    })
    .await
    .map_err(|_| lost(anyhow!("no auth answer in time")))??;
    match answer {
        (AuthCode::Ok, _) => Ok(socket),
        (AuthCode::Expired, msg) => Err(Failure::Fatal(anyhow!(
            "the token was refused ({msg}): log in again"
        ))),
        (code, msg) => Err(Failure::Fatal(anyhow!(
            "auth refused: code {}: {msg}",
            code as u8
        ))),
    }
}

async fn write_frame(socket: &mut Socket, frame: &ClientFrame) -> Result<(), Failure> {
    let text = serde_json::to_string(frame).map_err(|err| Failure::Fatal(err.into()))?;
    socket.send(WsMessage::text(text)).await.map_err(lost)
}

/// The next frame the server sends; pings are answered by tungstenite as it reads.
async fn next_frame(socket: &mut Socket) -> Result<ServerFrame, Failure> {
    loop {
        match socket.next().await {
            None => return Err(lost(anyhow!("the connection ended"))),
            Some(Err(err)) => return Err(lost(err)),
            Some(Ok(WsMessage::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => return Ok(frame),
                // A frame of a newer protocol: a client ignores what it does not know.
                Err(_) => continue,
            },
            Some(Ok(WsMessage::Close(close))) => {
                let code = close.as_ref().map(|close| u16::from(close.code));
                let reason = close.map(|close| close.reason.to_string()).unwrap_or_default();
                return Err(Failure::Lost(
                    anyhow!(
                        "the server closed the connection ({}: {reason})",
                        code.unwrap_or(1005)
                    ),
                    code,
                ));
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// The client guide's reconnect and resend delays: the shared capped exponential backoff with
/// equal jitter (0.5 s doubling to 30 s), so clients dropped together do not come back together;
/// a 1001 (the gateway is draining; another one is ready) is retried almost at once.
#[derive(Debug)]
struct Backoff(chatoy_protocol::backoff::Backoff);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(chatoy_protocol::backoff::Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
        ))
    }
}

impl Backoff {
    fn next(&mut self, close_code: Option<u16>) -> Duration {
        let delay = self.0.next_delay();
        if close_code == Some(u16::from(CloseCode::Away)) {
            delay.min(Duration::from_millis(250))
        } else {
            delay
        }
    }

    fn reset(&mut self) {
        self.0.reset();
    }
}

/// What became of one `msg`.
enum Outcome {
    Stored(Timestamp),
    /// Codes 4 and 5: the same uuid again, after a pause.
    Retry(SendCode, String),
}

/// Sends `messages` (uuid, text) in order, each once stored before the next; see the module doc.
async fn send(
    http: &Http,
    token: &str,
    room: u64,
    messages: VecDeque<(String, String)>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut queue = messages;
    let mut reconnects = Backoff::default();
    let mut retries = Backoff::default();
    let mut deadline = Instant::now() + timeout;
    let mut socket: Option<Socket> = None;
    while let Some((uuid, text)) = queue.front() {
        if Instant::now() >= deadline {
            bail!(
                "message {uuid} not stored within {}",
                humantime::format_duration(timeout)
            );
        }
        let attempt = async {
            if socket.is_none() {
                socket = Some(connect(http, token, None).await?);
            }
            let Some(ws) = socket.as_mut() else {
                return Err(lost(anyhow!("no connection")));
            };
            deliver(ws, uuid, room, text).await
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Err(_) => continue,
            Ok(Ok(Outcome::Stored(sent))) => {
                println!("{uuid}\t{sent}");
                queue.pop_front();
                reconnects.reset();
                retries.reset();
                deadline = Instant::now() + timeout;
            }
            Ok(Ok(Outcome::Retry(code, msg))) => {
                let pause = retries.next(None);
                eprintln!(
                    "chatoy: {uuid}: code {} ({msg}); resending the same uuid in {pause:.1?}",
                    code as u8
                );
                tokio::time::sleep(pause).await;
            }
            Ok(Err(Failure::Fatal(err))) => return Err(err),
            Ok(Err(Failure::Lost(err, code))) => {
                socket = None;
                let pause = reconnects.next(code);
                eprintln!("chatoy: {err:#}; reconnecting in {pause:.1?}");
                tokio::time::sleep(pause).await;
            }
        }
    }
    if let Some(mut ws) = socket {
        let _ = ws.close(None).await;
    }
    Ok(())
}

/// Sends one `msg` and waits for its `send`.
async fn deliver(socket: &mut Socket, uuid: &str, room: u64, text: &str) -> Result<Outcome, Failure> {
    let frame = ClientFrame::Msg {
        uuid: uuid.to_owned(),
        room,
        data: MessageContent::Text {
            text: text.to_owned(),
        },
    };
    write_frame(socket, &frame).await?;
    loop {
        let ServerFrame::Send {
            code,
            msg,
            uuid: acked,
            sent,
        } = next_frame(socket).await?
        else {
            continue;
        };
        if acked != uuid {
            continue;
        }
        return match code {
            SendCode::Ok => Ok(Outcome::Stored(sent)),
            SendCode::RateLimited | SendCode::Unavailable => Ok(Outcome::Retry(code, msg)),
            // Lost authentication: a new connection authenticates again.
            SendCode::NotAuthenticated => Err(lost(anyhow!("not authenticated: {msg}"))),
            SendCode::NotMember | SendCode::Invalid => Err(Failure::Fatal(anyhow!(
                "message {uuid} refused: code {}: {msg}",
                code as u8
            ))),
        };
    }
}

/// The uuids already printed, the oldest forgotten past [`SEEN_CAPACITY`].
#[derive(Default)]
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// Whether `uuid` is new (and remembers it).
    fn insert(&mut self, uuid: &str) -> bool {
        if self.set.contains(uuid) {
            return false;
        }
        if self.order.len() >= SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(uuid.to_owned());
        self.order.push_back(uuid.to_owned());
        true
    }
}

/// `chatoy client tail`.
struct Tail<'a> {
    http: &'a Http,
    token: &'a str,
    room: u64,
    json: bool,
    count: Option<u64>,
    printed: u64,
    seen: Seen,
    /// The greatest `sent` printed: the `since` of the next connection.
    last: Option<Timestamp>,
    /// User id → username, for the text output.
    names: HashMap<u64, String>,
}

impl Tail<'_> {
    async fn run(mut self, history: u16) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        let mut first = true;
        // Unless --since says where to start: the recent history, whose newest `sent` (printed
        // or not) is where the socket resumes, so nothing sent meanwhile is missed.
        if self.last.is_none() && self.catch_up(history.max(1), usize::from(history)).await? {
            return Ok(());
        }
        loop {
            // Resume per room (docs/client-guide.md §4): this room, from the newest `sent` printed.
            let since = self
                .last
                .map(|last| Since::Rooms(std::collections::BTreeMap::from([(self.room, last)])));
            let mut socket = match connect(self.http, self.token, since).await {
                Ok(socket) => socket,
                Err(Failure::Fatal(err)) => return Err(err),
                Err(Failure::Lost(err, code)) => {
                    if first {
                        // The first connection failing is most likely a wrong URL: say so.
                        return Err(err);
                    }
                    let pause = backoff.next(code);
                    eprintln!("chatoy: {err:#}; reconnecting in {pause:.1?}");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            backoff.reset();
            // Still no resume point: the room was empty when tail started, so whatever it holds
            // now is new. Overlap with the live traffic is de-duplicated.
            if self.last.is_none() && self.catch_up(200, 200).await? {
                let _ = socket.close(None).await;
                return Ok(());
            }
            first = false;
            loop {
                match next_frame(&mut socket).await {
                    Ok(ServerFrame::Recv { data }) if data.room == self.room => {
                        if self.show(data).await? {
                            let _ = socket.close(None).await;
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(Failure::Fatal(err)) => return Err(err),
                    Err(Failure::Lost(err, code)) => {
                        let pause = backoff.next(code);
                        eprintln!("chatoy: {err:#}; reconnecting in {pause:.1?}");
                        tokio::time::sleep(pause).await;
                        break;
                    }
                }
            }
        }
    }

    /// Fetches the room's newest `fetch` messages and prints the newest `print` of them not
    /// printed yet, oldest first (the others only count as seen); returns whether `--count` is
    /// reached.
    async fn catch_up(&mut self, fetch: u16, print: usize) -> anyhow::Result<bool> {
        let mut page = self.http.history(self.token, self.room, fetch).await?;
        page.reverse();
        let skip = page.len().saturating_sub(print);
        for (i, message) in page.into_iter().enumerate() {
            if i < skip {
                self.seen.insert(&message.uuid);
                self.last = self.last.max(Some(message.sent));
            } else if self.show(message).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Prints a message unless it was printed already; returns whether `--count` is reached.
    async fn show(&mut self, message: Message) -> anyhow::Result<bool> {
        if !self.seen.insert(&message.uuid) {
            return Ok(false);
        }
        self.last = self.last.max(Some(message.sent));
        if self.json {
            println!("{}", serde_json::to_string(&message)?);
        } else {
            let name = self.name(message.sender).await;
            let MessageContent::Text { text } = &message.data;
            println!("{} {name}: {text}", message.sent);
        }
        self.printed += 1;
        Ok(self.count.is_some_and(|count| self.printed >= count))
    }

    /// A sender's username (its id if it cannot be looked up).
    async fn name(&mut self, id: u64) -> String {
        if let Some(name) = self.names.get(&id) {
            return name.clone();
        }
        let path = format!("/users/{id}");
        let name = match self
            .http
            .call::<User>(reqwest::Method::GET, &path, None, None::<&()>)
            .await
        {
            Ok(user) => user.username,
            Err(_) => format!("user{id}"),
        };
        self.names.insert(id, name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next(None);
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        for _ in 0..10 {
            backoff.next(None);
        }
        let late = backoff.next(None);
        assert!(
            late >= Duration::from_secs(15) && late <= Duration::from_secs(30),
            "{late:?}"
        );
        let away = backoff.next(Some(1001));
        assert!(
            away <= Duration::from_millis(250),
            "a drain is retried at once: {away:?}"
        );
        backoff.reset();
        assert!(backoff.next(None) <= Duration::from_millis(500));
    }

    #[test]
    fn seen_forgets_the_oldest() {
        let mut seen = Seen::default();
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
        for i in 0..SEEN_CAPACITY {
            seen.insert(&i.to_string());
        }
        assert!(seen.insert("a"), "the oldest was forgotten");
        assert_eq!(seen.set.len(), SEEN_CAPACITY);
    }

    #[test]
    fn urls() {
        let http = Http::new("http://127.0.0.1:8080/").unwrap();
        assert_eq!(http.base, "http://127.0.0.1:8080");
        assert_eq!(http.ws_url, "ws://127.0.0.1:8080/ws");
        assert!(Http::new("https://chat.example.com").is_err());
        assert!(Http::new("127.0.0.1:8080").is_err());
    }
}
