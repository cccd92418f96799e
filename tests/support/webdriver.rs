//! A minimal W3C WebDriver client for driving headless Chromium through `chromedriver`.
//!
//! Just what the browser tests need — a session, navigation, finding elements by CSS selector,
//! clicking, typing, reading text — spoken as plain HTTP/1.1 over a loopback `TcpStream`
//! (one request per connection), so the tests need no WebDriver crate. chromedriver runs as
//! a child process on a free loopback port and is killed when the [`Browser`] is dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The browser binary Debian's `chromium` package installs.
const CHROMIUM: &str = "/usr/bin/chromium";

/// The W3C key under which an element reference is returned.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The WebDriver key code of Enter, for [`Browser::press_keys`].
pub const ENTER: char = '\u{E007}';

/// How long one WebDriver command may take (navigation waits for the page to load).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A reference to an element on the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

/// A headless Chromium session driven through a chromedriver child process.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

/// Why browser tests cannot run here, if they cannot: Chromium or chromedriver is missing.
pub fn missing_browser() -> Option<String> {
    let driver = Command::new("chromedriver")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if Path::new(CHROMIUM).exists() && driver {
        None
    } else {
        Some(
            "skipping: chromium/chromedriver not installed; \
             apt-get install -y chromium chromium-driver"
                .to_string(),
        )
    }
}

impl Browser {
    /// Starts chromedriver and opens a headless Chromium session, or prints why it cannot
    /// and answers `None` when Chromium or chromedriver is not installed.
    pub fn start_if_installed() -> Option<Browser> {
        if let Some(reason) = missing_browser() {
            eprintln!("{reason}");
            return None;
        }
        Some(Browser::start())
    }

    /// Starts chromedriver on a free loopback port and opens a headless Chromium session.
    pub fn start() -> Browser {
        // The port is free when chosen but could be taken before chromedriver binds it: then
        // chromedriver exits, and another port is tried.
        for _ in 0..3 {
            let port = free_port();
            let driver = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn chromedriver");
            let mut browser = Browser {
                driver,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                session: String::new(),
            };
            if browser.wait_until_ready() {
                browser.session = browser.new_session();
                return browser;
            }
        }
        panic!("chromedriver exited three times before it was ready");
    }

    /// Waits (up to 15 s) until chromedriver answers `/status` with `ready`; false if it
    /// exited first.
    fn wait_until_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((200, status)) = request(self.addr, "GET", "/status", None) {
                if status["value"]["ready"] == true {
                    return true;
                }
            }
            if let Ok(Some(_)) = self.driver.try_wait() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver on {} was not ready within 15 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn new_session(&self) -> String {
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            },
        }}});
        let created = self.command("POST", "/session", Some(capabilities));
        created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {created}"))
            .to_string()
    }

    /// Sends one command to chromedriver and returns its `value`; panics on a WebDriver
    /// error with chromedriver's message.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        match self.try_command(method, path, body) {
            Ok(value) => value,
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// Like [`Browser::command`], answering a WebDriver error (e.g. "no such element") as
    /// `Err` with its code and message.
    fn try_command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (status, reply) =
            request(self.addr, method, path, body.as_ref()).map_err(|e| e.to_string())?;
        let value = reply.get("value").cloned().unwrap_or(Value::Null);
        if status == 200 {
            Ok(value)
        } else {
            Err(format!(
                "{status} {}: {}",
                value["error"].as_str().unwrap_or("?"),
                value["message"].as_str().unwrap_or("")
            ))
        }
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.command(
            "POST",
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        );
    }

    /// The URL of the current page.
    pub fn current_url(&self) -> String {
        self.command("GET", &self.session_path("/url"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element matching `css`, if there is one now.
    pub fn find(&self, css: &str) -> Option<Element> {
        let found = self
            .try_command(
                "POST",
                &self.session_path("/element"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .ok()?;
        found[ELEMENT_KEY]
            .as_str()
            .map(|id| Element(id.to_string()))
    }

    /// Waits (up to `timeout`) until an element matches `css`, and returns it.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let mut found = None;
        self.wait_until(&format!("an element matches {css:?}"), timeout, || {
            found = self.find(css);
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits (up to `timeout`) until nothing matches `css`.
    pub fn wait_for_absence(&self, css: &str, timeout: Duration) {
        self.wait_until(&format!("nothing matches {css:?}"), timeout, || {
            self.find(css).is_none()
        });
    }

    /// Polls `done` every 100 ms until it holds; panics naming `what` after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} in vain until {what}; the status line reads {:?}",
                self.find("#status")
                    .map(|s| self.text(&s))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks `element`.
    pub fn click(&self, element: &Element) {
        self.command(
            "POST",
            &self.session_path(&format!("/element/{}/click", element.0)),
            Some(json!({})),
        );
    }

    /// Types `text` into `element`.
    pub fn send_keys(&self, element: &Element, text: &str) {
        self.command(
            "POST",
            &self.session_path(&format!("/element/{}/value", element.0)),
            Some(json!({ "text": text })),
        );
    }

    /// The rendered text of `element` (empty for a vanished element).
    pub fn text(&self, element: &Element) -> String {
        self.try_command(
            "GET",
            &self.session_path(&format!("/element/{}/text", element.0)),
            None,
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
    }

    /// Types `text` on the keyboard into whatever has the focus, as a person would (unlike
    /// [`Browser::send_keys`], which first focuses an element). WebDriver's key codes are
    /// keys: [`ENTER`] presses Enter.
    pub fn press_keys(&self, text: &str) {
        let actions: Vec<Value> = text
            .chars()
            .flat_map(|c| {
                let key = c.to_string();
                [
                    json!({ "type": "keyDown", "value": key }),
                    json!({ "type": "keyUp", "value": key }),
                ]
            })
            .collect();
        self.command(
            "POST",
            &self.session_path("/actions"),
            Some(json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] })),
        );
    }

    /// The element that has the focus (the document's body when none has).
    pub fn focused(&self) -> Element {
        let found = self.command("GET", &self.session_path("/element/active"), None);
        Element(
            found[ELEMENT_KEY]
                .as_str()
                .unwrap_or_else(|| panic!("no active element in {found}"))
                .to_string(),
        )
    }

    /// The value of `element`'s attribute `name`, if it has one.
    pub fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        self.command(
            "GET",
            &self.session_path(&format!("/element/{}/attribute/{name}", element.0)),
            None,
        )
        .as_str()
        .map(str::to_string)
    }

    /// Runs `script`, the body of a function (its arguments in `arguments`), in the page, and
    /// returns what it returns.
    pub fn execute(&self, script: &str) -> Value {
        self.command(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Whether `element` is shown on the page.
    pub fn is_displayed(&self, element: &Element) -> bool {
        self.command(
            "GET",
            &self.session_path(&format!("/element/{}/displayed", element.0)),
            None,
        ) == true
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(self.addr, "DELETE", &self.session_path(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One HTTP/1.1 exchange with chromedriver: sends `body` as JSON, answers the status and the
/// parsed JSON reply.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let raw = read_response(&mut stream)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other(format!("malformed reply: {raw:?}")))
}

/// Reads a response until its Content-Length is complete or the peer closes.
fn read_response(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if body_complete(&raw) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn body_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    content_length(&head).is_some_and(|len| raw.len() - (end + 4) >= len)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// The status code and JSON body of a raw response.
fn parse_response(raw: &str) -> Option<(u16, Value)> {
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = match content_length(head) {
        Some(len) => body.get(..len)?,
        None => body,
    };
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).ok()?
    };
    Some((status, json))
}
