//! The reference clients against a real server: `chatoy client` (register, login, rooms, send
//! with its ack, retries of codes 4 and 5 with the same uuid, tail resuming with `since` across
//! a restart without a duplicate) and the web client's files as the gateway serves them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use chatoy_testkit::scrub_env;
use chatoy_testkit::{random_hex, uuids, wait_exit, within, Server, TempDir, PASSWORD, WAIT};

/// One user of the terminal client: its own token file in the test's directory.
struct Cli {
    base: String,
    token_file: PathBuf,
    dir: PathBuf,
}

/// What one `chatoy client` command did.
#[derive(Debug)]
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn new(server: &Server, dir: &Path, name: &str) -> Cli {
        Cli {
            base: server.base_url(),
            token_file: dir.join(format!("{name}.token")),
            dir: dir.to_owned(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(chatoy_testkit::chatoy_binary());
        scrub_env(&mut command);
        command
            .arg("client")
            .arg("--url")
            .arg(&self.base)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(args)
            .env("CHATOY_PASSWORD", PASSWORD);
        command
    }

    /// Runs a command to its end with `stdin` as its input.
    async fn run_with_input(&self, args: &[&str], stdin: &str, limit: Duration) -> Run {
        let mut command = self.command(args);
        let name = random_hex(8);
        let (out, err) = (
            self.dir.join(format!("{name}.out")),
            self.dir.join(format!("{name}.err")),
        );
        command
            .stdin(Stdio::piped())
            .stdout(fs::File::create(&out).expect("stdout file"))
            .stderr(fs::File::create(&err).expect("stderr file"));
        let mut child = command.spawn().expect("spawn chatoy client");
        let mut input = child.stdin.take().expect("piped stdin");
        input.write_all(stdin.as_bytes()).expect("write stdin");
        drop(input);
        let status = wait_exit(&mut child, limit, &format!("chatoy client {args:?}")).await;
        Run {
            success: status.success(),
            stdout: fs::read_to_string(&out).unwrap_or_default(),
            stderr: fs::read_to_string(&err).unwrap_or_default(),
        }
    }

    /// Runs a command that must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let run = self.run_with_input(args, "", WAIT).await;
        assert!(run.success, "chatoy client {args:?} failed: {run:?}");
        run.stdout
    }

    /// Starts a long-running command (`tail`) with its stdout going to the returned file.
    fn spawn(&self, args: &[&str]) -> (Child, PathBuf) {
        let name = random_hex(8);
        let out = self.dir.join(format!("{name}.out"));
        let err = self.dir.join(format!("{name}.err"));
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("stdout file"))
            .stderr(fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn chatoy client");
        (child, out)
    }

    async fn register_and_login(&self, username: &str) {
        self.ok(&["register", username]).await;
        let said = self.ok(&["login", username]).await;
        assert!(said.contains(&format!("logged in as {username}")), "{said}");
        let token = fs::read_to_string(&self.token_file).expect("token file");
        assert_eq!(token.trim().len(), 64, "a 64-hex token is saved: {token:?}");
    }
}

/// The `uuid<TAB>sent` lines `send` prints, one per stored message.
fn acks(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .map(|line| {
            let (uuid, sent) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("not an ack line: {line:?}"));
            (uuid.to_owned(), sent.to_owned())
        })
        .collect()
}

/// The messages a `tail --json` printed so far.
fn tailed(out: &Path) -> Vec<Value> {
    fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON: {line:?}: {err}")))
        .collect()
}

async fn wait_for_lines(out: &Path, n: usize, what: &str) {
    within(WAIT * 2, what, async {
        while tailed(out).len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn terminal_client_accounts_rooms_send_and_tail() {
    let server = Server::start().await;
    let dir = TempDir::new();
    let alice = Cli::new(&server, dir.path(), "alice");
    let bob = Cli::new(&server, dir.path(), "bob");
    let (a_name, b_name) = (format!("alice{}", random_hex(6)), format!("bob{}", random_hex(6)));
    alice.register_and_login(&a_name).await;
    bob.register_and_login(&b_name).await;

    let room = alice.ok(&["create", "terminal"]).await.trim().to_owned();
    room.parse::<u64>().expect("create prints the room id");
    assert_eq!(
        bob.ok(&["join", &room]).await.trim(),
        format!("joined room {room}")
    );
    assert_eq!(bob.ok(&["rooms"]).await, format!("{room}\tterminal\n"));

    // One message before bob tails: he gets it from the history, then two live ones.
    let first = acks(&alice.ok(&["send", &room, "hello", "bob"]).await);
    assert_eq!(first.len(), 1);
    let (mut tail, out) = bob.spawn(&["tail", &room, "--json", "--count", "3"]);
    wait_for_lines(&out, 1, "the history line of tail").await;
    let more = alice
        .run_with_input(&["send", &room], "second line\n\nthird line\n", WAIT)
        .await;
    assert!(more.success, "{more:?}");
    let more = acks(&more.stdout);
    assert_eq!(more.len(), 2, "one ack per non-empty stdin line");
    let status = wait_exit(&mut tail, WAIT, "tail --count 3").await;
    assert!(status.success(), "tail exited with {status}");
    let got = tailed(&out);
    let sent: Vec<String> = first.iter().chain(&more).map(|(uuid, _)| uuid.clone()).collect();
    assert_eq!(uuids(&got), sent, "every message once, in order");
    let texts: Vec<&str> = got
        .iter()
        .map(|m| m["data"]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, ["hello bob", "second line", "third line"]);
    for (message, (_, sent)) in got.iter().zip(first.iter().chain(&more)) {
        assert_eq!(
            chatoy_testkit::ts(message["sent"].as_str().expect("sent")),
            chatoy_testkit::ts(sent)
        );
    }

    // The same uuid again is the same message: same `sent`, stored once.
    let uuid = uuid::Uuid::new_v4().to_string();
    let once = alice.ok(&["send", &room, "--uuid", &uuid, "only once"]).await;
    let twice = alice.ok(&["send", &room, "--uuid", &uuid, "only once"]).await;
    assert_eq!(once, twice, "a resent uuid answers with the original sent");
    let text = bob.ok(&["tail", &room, "--count", "4", "--history", "10"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].ends_with(&format!(" {a_name}: hello bob")), "{text}");
    assert!(lines[3].ends_with(&format!(" {a_name}: only once")), "{text}");

    // Refusals that retrying cannot fix fail at once, with the server's reason.
    let outsider = Cli::new(&server, dir.path(), "outsider");
    outsider
        .register_and_login(&format!("out{}", random_hex(6)))
        .await;
    let refused = outsider
        .run_with_input(&["send", &room, "let me in"], "", WAIT)
        .await;
    assert!(
        !refused.success && refused.stderr.contains("code 2"),
        "{refused:?}"
    );

    // Logging out revokes the token: the next command is refused.
    bob.ok(&["logout"]).await;
    assert!(!bob.token_file.exists());
    let after = bob.run_with_input(&["rooms"], "", WAIT).await;
    assert!(
        !after.success && after.stderr.contains("not logged in"),
        "{after:?}"
    );
}

#[tokio::test]
async fn terminal_client_resends_the_same_uuid_after_codes_4_and_5() {
    let mut server = Server::start_with_sqlite(
        &["--msg-rate", "2", "--msg-burst", "1"],
        &["--sqlite-busy-timeout", "200ms"],
    )
    .await;
    let dir = TempDir::new();
    let alice = Cli::new(&server, dir.path(), "alice");
    alice.register_and_login(&format!("alice{}", random_hex(6))).await;
    let room = alice.ok(&["create", "retries"]).await.trim().to_owned();

    // Six messages on one socket allowed two a second: code 4, resent until stored, in order.
    let lines: Vec<String> = (0..6).map(|i| format!("burst {i}")).collect();
    let burst = alice
        .run_with_input(&["send", &room], &(lines.join("\n") + "\n"), WAIT * 3)
        .await;
    assert!(burst.success, "{burst:?}");
    assert!(
        burst.stderr.contains("code 4"),
        "the rate limit was hit: {burst:?}"
    );
    let stored = acks(&burst.stdout);
    assert_eq!(stored.len(), 6);

    // The store refuses writes for a while: code 5, resent with the same uuid until it is back.
    server.block_writes().await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let mut command = alice.command(&["send", &room, "--uuid", &uuid, "after the outage"]);
    let err = dir.path().join("outage.err");
    let out = dir.path().join("outage.out");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("stdout"))
        .stderr(fs::File::create(&err).expect("stderr"))
        .spawn()
        .expect("spawn send");
    within(WAIT * 3, "a code 5 answer", async {
        while !fs::read_to_string(&err).unwrap_or_default().contains("code 5") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    server.unblock_writes().await;
    let status = wait_exit(&mut child, WAIT * 3, "send after the outage").await;
    assert!(
        status.success(),
        "send failed: {}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    assert_eq!(acks(&fs::read_to_string(&out).expect("stdout"))[0].0, uuid);

    let token = fs::read_to_string(&alice.token_file).expect("token");
    let history = server
        .api()
        .history(token.trim(), room.parse().expect("id"), None, None)
        .await;
    let mut texts: Vec<&str> = history
        .iter()
        .map(|m| m["data"]["text"].as_str().expect("text"))
        .collect();
    texts.reverse();
    let mut expected: Vec<&str> = lines.iter().map(String::as_str).collect();
    expected.push("after the outage");
    assert_eq!(texts, expected, "every message stored once, in order");
}

#[tokio::test]
async fn terminal_client_tail_resumes_across_a_restart() {
    let mut server = Server::start().await;
    let dir = TempDir::new();
    let alice = Cli::new(&server, dir.path(), "alice");
    let bob = Cli::new(&server, dir.path(), "bob");
    alice.register_and_login(&format!("alice{}", random_hex(6))).await;
    bob.register_and_login(&format!("bob{}", random_hex(6))).await;
    let room = alice.ok(&["create", "resume"]).await.trim().to_owned();
    bob.ok(&["join", &room]).await;

    let (mut tail, out) = bob.spawn(&["tail", &room, "--json", "--count", "4", "--history", "0"]);
    // With --history 0 tail prints only what is sent after it started: send until one shows.
    let mut sent = Vec::new();
    within(WAIT * 2, "tail to connect", async {
        while tailed(&out).is_empty() {
            sent.extend(acks(&alice.ok(&["send", &room, "before the restart"]).await));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // Those sent before it started are not printed: it starts at the first it printed.
    let first = uuids(&tailed(&out))[0].clone();
    let start = sent
        .iter()
        .position(|(uuid, _)| *uuid == first)
        .expect("tail printed a sent message");
    let mut sent = sent.split_off(start);
    assert!(
        sent.len() < 4,
        "tail connected only after {} messages",
        sent.len()
    );
    wait_for_lines(&out, sent.len(), "every message sent before the restart").await;

    // The server goes away (1001) and comes back on the same data; what is sent before tail
    // reconnects reaches it through `since`.
    let status = server.terminate(WAIT * 3).await;
    assert!(status.success(), "server exit: {status}");
    server.restart().await;
    let alice = Cli::new(&server, dir.path(), "alice");
    while sent.len() < 4 {
        sent.extend(acks(&alice.ok(&["send", &room, "after the restart"]).await));
    }
    let status = wait_exit(&mut tail, WAIT * 3, "tail to print 4 messages").await;
    assert!(status.success(), "tail exited with {status}");
    let got = tailed(&out);
    let expected: Vec<String> = sent.iter().map(|(uuid, _)| uuid.clone()).collect();
    assert_eq!(uuids(&got), expected, "each message once, in order, none lost");
}

#[tokio::test]
async fn web_client_is_served_with_types_cache_and_security_headers() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let base = server.base_url();
    for (path, kind, needle) in [
        (
            "/",
            "text/html",
            "<script type=\"module\" src=\"/app.js\"></script>",
        ),
        ("/app.js", "text/javascript", "new WebSocket("),
        ("/app.css", "text/css", ".conn"),
    ] {
        let response = http.get(format!("{base}{path}")).send().await.expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}: {headers:?}");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("cache-control"), "no-cache");
        assert!(header("content-security-policy").contains("default-src 'none'"));
        let body = response.text().await.expect("body");
        assert!(body.contains(needle), "{path} is the web client's file");

        let etag = header("etag");
        assert!(etag.starts_with('"'), "{path}: strong ETag {etag:?}");
        let again = http
            .get(format!("{base}{path}"))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("GET");
        assert_eq!(again.status(), 304, "{path} revalidates");
    }
    let post = http.post(format!("{base}/")).send().await.expect("POST /");
    assert_eq!(post.status(), 405);
    let missing = http.get(format!("{base}/index.html")).send().await.expect("GET");
    assert_eq!(missing.status(), 404);
}
