//! Writes that pass as reads, end to end: a method-override header, a read with a body and a
//! protocol upgrade are decided by what they can do at the origin, not by their method line.
//! The upgrade tests run a real WebSocket echo origin (tokio-tungstenite) on loopback and a
//! real WebSocket client through the gateway's listener; the agents' run modes are decided
//! by the shipped `run-modes.cedar`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use support::*;

/// A gateway with a Review agent (127.0.0.1), a ReadOnly one (127.0.0.2) and an Autonomous
/// one (127.0.0.3), decided by the shipped run-mode policies (no allowlist: the origins are
/// on loopback).
fn gateway() -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\
         [[agents]]\nid = \"review\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n\
         [[agents]]\nid = \"ro\"\nrun_mode = \"ReadOnly\"\npeers = [\"127.0.0.2\"]\n\
         [[agents]]\nid = \"auto\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.3\"]\n",
        loopback_upstream(None)
    );
    Gateway::start_with_policies(&config, &[RUN_MODES])
}

/// A WebSocket origin on loopback that echoes every text and binary message.
struct WsOrigin {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl WsOrigin {
    async fn start() -> WsOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    while let Some(Ok(message)) = ws.next().await {
                        if (message.is_text() || message.is_binary())
                            && ws.send(message).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        WsOrigin {
            addr,
            handshakes,
            task,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for WsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The gateway's answer to a WebSocket handshake: its head, and — after a 101 — the open
/// WebSocket, or the JSON body of a refusal.
struct Handshake {
    status: u16,
    head: String,
    body: String,
    socket: Option<WebSocketStream<TcpStream>>,
}

/// Sends a WebSocket handshake for `ws://<origin>/chat` through the gateway's listener at
/// `egress` from the address `source` (which picks the agent), in absolute form as a proxy
/// client does.
async fn ws_connect(egress: SocketAddr, origin: SocketAddr, source: &str) -> Handshake {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source");
    let mut stream = socket.connect(egress).await.expect("connect");
    let request = format!(
        "GET http://{origin}/chat HTTP/1.1\r\nHost: {origin}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    // The head, byte by byte, so nothing of what follows it is read here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await.expect("read the answer's head");
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 101 {
        let ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        return Handshake {
            status,
            head,
            body: String::new(),
            socket: Some(ws),
        };
    }
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body)).await;
    Handshake {
        status,
        head,
        body: String::from_utf8_lossy(&body).to_string(),
        socket: None,
    }
}

/// Sends `n` text messages over `ws` and checks each comes back.
async fn echo<S>(ws: &mut WebSocketStream<S>, n: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..n {
        let text = format!("message {i} through the gateway");
        ws.send(Message::text(text.clone())).await.expect("send");
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo in time")
            .expect("an echo")
            .expect("a message");
        assert_eq!(back.into_text().expect("text").as_str(), text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_agents_websocket_upgrade_is_held_then_approved_and_the_stream_works() {
    let origin = WsOrigin::start().await;
    let gw = gateway();
    // The handshake waits for a person: it runs on a task of its own.
    let connecting = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(20),
        ws_connect(gw.egress, origin.addr, "127.0.0.1"),
    ));
    let approval = tokio::task::block_in_place(|| {
        wait_for_approvals(&gw, "state=pending&agent=review", 1).remove(0)
    });
    assert_eq!(approval["method"], "GET");
    assert_eq!(approval["policies"][0], "review-approved-upgrades");
    assert_eq!(
        origin.handshakes(),
        0,
        "nothing reaches the origin while held"
    );
    let id = approval["id"].as_str().expect("id").to_string();
    let approved = tokio::task::block_in_place(|| {
        gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), Some("{}"))
    });
    assert_eq!(approved.status, 200, "{approved:?}");
    let mut handshake = connecting
        .await
        .expect("task")
        .expect("the handshake ends once approved");
    assert_eq!(
        handshake.status, 101,
        "{}{}",
        handshake.head, handshake.body
    );
    let ws = handshake.socket.as_mut().expect("an open WebSocket");
    echo(ws, 5).await;
    ws.close(None).await.expect("close");
    drop(handshake);
    assert_eq!(origin.handshakes(), 1);

    // The upgraded connection is one audit record, written when it closed, with the bytes
    // that flowed each way inside it: from the sandbox five masked text frames (2 bytes of
    // header, 4 of mask, the text) and a masked close frame; to it five unmasked frames (and
    // perhaps the origin's close reply, 2 bytes).
    let text_bytes: u64 = (0..5)
        .map(|i| format!("message {i} through the gateway").len() as u64)
        .sum();
    let records = tokio::task::block_in_place(|| audit_records(&gw, "review", 1));
    let record = &records[0];
    assert_eq!(record["upgrade"], "websocket", "{record}");
    assert_eq!(record["status"], 101);
    assert_eq!(record["approval"], id.as_str());
    assert_eq!(
        record["bytes_in"].as_u64(),
        Some(5 * 6 + text_bytes + 6),
        "{record}"
    );
    let bytes_out = record["bytes_out"].as_u64().expect("bytes_out");
    assert!(
        [5 * 2 + text_bytes, 5 * 2 + text_bytes + 2].contains(&bytes_out),
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_agent_may_not_upgrade_and_an_autonomous_one_may() {
    let origin = WsOrigin::start().await;
    let gw = gateway();
    let refused = ws_connect(gw.egress, origin.addr, "127.0.0.2").await;
    assert_eq!(refused.status, 403, "{}{}", refused.head, refused.body);
    let body: serde_json::Value = serde_json::from_str(&refused.body).expect("JSON");
    assert_eq!(body["error"], "denied");
    assert_eq!(body["policies"][0], "read-only-no-upgrades");
    assert_eq!(origin.handshakes(), 0);

    let mut allowed = ws_connect(gw.egress, origin.addr, "127.0.0.3").await;
    assert_eq!(allowed.status, 101, "{}{}", allowed.head, allowed.body);
    echo(allowed.socket.as_mut().expect("open"), 2).await;
    assert_eq!(origin.handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_or_a_body_makes_a_read_a_write() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = gateway();
    let url = format!("http://127.0.0.1:{}/items/1", origin.port());
    let as_agent = |source: &str, extra: &[&str]| {
        let mut a = args!["--interface", source, "-x", gw.proxy_url(), &url];
        a.extend(extra.iter().map(|s| s.to_string()));
        curl_async(a)
    };
    // ReadOnly: a read goes; a read that asks for DELETE, or carries a body, does not.
    assert_eq!(as_agent("127.0.0.2", &[]).await.status, 200);
    for extra in [
        vec!["-H", "X-HTTP-Method-Override: DELETE"],
        vec!["-H", "X-HTTP-Method: delete"],
        vec!["-H", "X-Method-Override: PUT"],
        vec!["-X", "GET", "--data-binary", "{\"delete\":true}"],
        vec!["-X", "OPTIONS", "--data-binary", "x"],
        // A write dressed as a read, the override dropped on the way as hop-by-hop.
        vec![
            "-X",
            "DELETE",
            "-H",
            "X-HTTP-Method-Override: GET",
            "-H",
            "Connection: X-HTTP-Method-Override",
        ],
    ] {
        let r = as_agent("127.0.0.2", &extra).await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (403, Some("denied")),
            "{extra:?}: {r:?}"
        );
    }
    // Override headers that disagree are refused as ambiguous.
    let r = as_agent(
        "127.0.0.2",
        &[
            "-H",
            "X-HTTP-Method: GET",
            "-H",
            "X-Method-Override: DELETE",
        ],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("ambiguous_method")),
        "{r:?}"
    );
    assert_eq!(
        origin.requests(),
        1,
        "only the plain read reached the origin"
    );

    // Review: the overridden read is held, and the approver sees what it asks for.
    let held = {
        let mut a = args![
            "-x",
            gw.proxy_url(),
            "-H",
            "X-HTTP-Method-Override: DELETE",
            &url
        ];
        a.extend(args!["--interface", "127.0.0.1"]);
        tokio::spawn(curl_async(a))
    };
    let approval = tokio::task::block_in_place(|| {
        wait_for_approvals(&gw, "state=pending&agent=review", 1).remove(0)
    });
    assert_eq!(
        approval["method"], "GET (x-http-method-override: DELETE)",
        "{approval}"
    );
    let id = approval["id"].as_str().expect("id");
    tokio::task::block_in_place(|| {
        gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), Some("{}"))
    });
    let released = held.await.expect("curl");
    assert_eq!(released.status, 200, "{released:?}");
    let seen = origin.last_seen();
    assert_eq!(seen.method, "GET");
    assert_eq!(
        seen.headers
            .get("x-http-method-override")
            .map(String::as_str),
        Some("DELETE"),
        "the origin gets the request as sent and approved"
    );
    let records = tokio::task::block_in_place(|| audit_records(&gw, "review", 1));
    assert_eq!(records[0]["method"], "GET (x-http-method-override: DELETE)");
}

/// A rustls server config for `host` with a certificate from [`origin_ca`].
fn origin_tls(host: &str) -> Arc<rustls::ServerConfig> {
    let (cert, key) = origin_ca().server_cert(&[host]);
    let der = |path: &std::path::Path| {
        pem::parse(std::fs::read_to_string(path).expect("PEM"))
            .expect("PEM")
            .contents()
            .to_vec()
    };
    let key = rustls::pki_types::PrivateKeyDer::try_from(der(&key)).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![der(&cert).into()], key)
    .expect("certificate");
    Arc::new(config)
}

/// How [`tls_ws_origin`] answers beyond echoing.
#[derive(Clone, Copy, PartialEq)]
enum TlsWsOrigin {
    /// Echoes text messages.
    Echo,
    /// First repeats the `Authorization` header of the handshake it was sent, as a debug
    /// endpoint might.
    Tell,
    /// As `Tell`, in two frames (a text frame and its continuation) cut inside the token.
    TellInFragments,
    /// As `TellInFragments`, with a pong between the two (which the sandbox's client takes
    /// apart from the message).
    TellAroundAPong,
    /// Accepts `permessage-deflate` whether or not it was offered.
    Deflate,
    /// Sends a masked frame, which only a client may send.
    Masked,
}

/// A WebSocket origin over TLS that echoes, and does what `behaviour` says.
async fn tls_ws_origin(
    host: &str,
    behaviour: TlsWsOrigin,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = pingora::tls::TlsAcceptor::from(origin_tls(host));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let seen = Arc::new(std::sync::Mutex::new(String::new()));
                let keep = seen.clone();
                // The callback's signature (and its large error type) is tungstenite's.
                #[allow(clippy::result_large_err)]
                let remember =
                    move |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                          mut response: tokio_tungstenite::tungstenite::handshake::server::Response| {
                        if let Some(auth) = request.headers().get("authorization") {
                            *keep.lock().expect("seen") = auth.to_str().unwrap_or("").to_string();
                        }
                        if behaviour == TlsWsOrigin::Deflate {
                            response.headers_mut().insert(
                                "sec-websocket-extensions",
                                http::HeaderValue::from_static("permessage-deflate"),
                            );
                        }
                        Ok(response)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, remember).await else {
                    return;
                };
                let told = format!("you sent: {}", seen.lock().expect("seen"));
                let sent = match behaviour {
                    TlsWsOrigin::Tell => ws.send(Message::text(told)).await,
                    TlsWsOrigin::TellInFragments | TlsWsOrigin::TellAroundAPong => {
                        let (first, rest) = told.split_at(told.len() - 10);
                        let first =
                            Frame::message(first.to_string(), OpCode::Data(Data::Text), false);
                        let rest =
                            Frame::message(rest.to_string(), OpCode::Data(Data::Continue), true);
                        let pong = match behaviour {
                            TlsWsOrigin::TellAroundAPong => Some(Message::Pong(b"x"[..].into())),
                            _ => None,
                        };
                        let mut sent = ws.send(Message::Frame(first)).await;
                        if let (Ok(()), Some(pong)) = (&sent, pong) {
                            sent = ws.send(pong).await;
                        }
                        match sent {
                            Ok(()) => ws.send(Message::Frame(rest)).await,
                            Err(e) => Err(e),
                        }
                    }
                    TlsWsOrigin::Masked => {
                        let frame = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
                        let tls = ws.get_mut();
                        match tls.write_all(&frame).await.and(tls.flush().await) {
                            Ok(()) => Ok(()),
                            Err(_) => return,
                        }
                    }
                    TlsWsOrigin::Echo | TlsWsOrigin::Deflate => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_stream_that_carries_the_injected_token_back_is_cut_off() {
    the_token_sent_back_is_cut_off(TlsWsOrigin::Tell).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_sent_back_in_two_websocket_frames_is_cut_off() {
    // On the wire a frame header lies between the token's halves; the sandbox's client joins
    // them into one message.
    the_token_sent_back_is_cut_off(TlsWsOrigin::TellInFragments).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_sent_back_in_two_websocket_frames_around_a_pong_is_cut_off() {
    the_token_sent_back_is_cut_off(TlsWsOrigin::TellAroundAPong).await;
}

/// An origin that sends the handshake's token back as its first message, as `behaviour`
/// says: the sandbox never receives it, and the record says why the connection ended.
async fn the_token_sent_back_is_cut_off(behaviour: TlsWsOrigin) {
    let (gw, authority, tls, _origin) = tokened_ws_tunnel(behaviour).await;
    let (mut ws, answer) = tokio_tungstenite::client_async(format!("wss://{authority}/chat"), tls)
        .await
        .expect("the handshake goes through (with the token injected)");
    assert_eq!(answer.status(), 101);
    // The origin's first message would carry the token: the connection ends before it.
    let mut received = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await
    {
        received.push(message.to_string());
    }
    assert!(
        received.iter().all(|m| !m.contains(WS_TOKEN)),
        "the token reached the sandbox: {received:?}"
    );
    let records = tokio::task::block_in_place(|| audit_records(&gw, "auto", 1));
    assert_eq!(
        (
            records[0]["upgrade"].as_str(),
            records[0]["error"].as_str(),
            records[0]["credential"].as_str()
        ),
        (Some("websocket"), Some("credential_reflected"), Some("p")),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_origin_accepts_an_extension_it_was_not_offered_is_refused() {
    let (gw, authority, tls, _origin) = tokened_ws_tunnel(TlsWsOrigin::Deflate).await;
    // The sandbox offers compression: the gateway takes the offer out, and the origin, which
    // compresses anyway, is not let through (its messages would hide the token from the scan).
    let mut request = format!("wss://{authority}/chat")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-extensions",
        http::HeaderValue::from_static("permessage-deflate"),
    );
    let refused = tokio_tungstenite::client_async(request, tls).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(answer)) = refused else {
        panic!("the upgrade was not refused: {refused:?}");
    };
    assert_eq!(answer.status(), 502);
    let body: serde_json::Value =
        serde_json::from_slice(answer.body().as_deref().unwrap_or_default()).expect("JSON body");
    assert_eq!(body["error"], "upstream_bad_response", "{body}");
    let records = tokio::task::block_in_place(|| audit_records(&gw, "auto", 1));
    assert_eq!(
        (
            records[0]["status"].as_u64(),
            records[0]["error"].as_str(),
            records[0]["upgrade"].as_str()
        ),
        (Some(502), Some("upstream_bad_response"), None),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_the_scan_cannot_read_ends_a_tokened_upgrade() {
    let (gw, authority, tls, _origin) = tokened_ws_tunnel(TlsWsOrigin::Masked).await;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{authority}/chat"), tls)
        .await
        .expect("handshake");
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the connection ended");
    assert!(
        !matches!(next, Some(Ok(Message::Text(_)))),
        "the masked frame reached the sandbox: {next:?}"
    );
    let records = tokio::task::block_in_place(|| audit_records(&gw, "auto", 1));
    assert_eq!(
        (
            records[0]["upgrade"].as_str(),
            records[0]["error"].as_str(),
            records[0]["bytes_out"].as_u64()
        ),
        (Some("websocket"), Some("upstream_bad_response"), Some(0)),
        "{records:?}"
    );
}

/// A gateway as [`tokened_ws_gateway`] makes it, in front of a TLS WebSocket origin that does
/// what `behaviour` says, and a sandbox's tunnel through it to the origin: the gateway, the
/// origin's authority, the tunnel, and the origin's task.
async fn tokened_ws_tunnel(
    behaviour: TlsWsOrigin,
) -> (
    Gateway,
    String,
    support::tunnel::Tls,
    tokio::task::JoinHandle<()>,
) {
    let (origin, task) = tls_ws_origin(WS_HOST, behaviour).await;
    let gw = tokened_ws_gateway(origin);
    let authority = format!("{WS_HOST}:{}", origin.port());
    let tls = support::tunnel::tunnel(&gw, &authority, WS_HOST, true, &[b"http/1.1"])
        .await
        .expect("tunnel");
    (gw, authority, tls, task)
}

const WS_HOST: &str = "ws.protected.test";
const WS_TOKEN: &str = "ws-static-token-6d0c1f2e9a";

/// A gateway injecting [`WS_TOKEN`] for [`WS_HOST`] over TLS on `origin`'s port, for the
/// Autonomous agent `auto` (127.0.0.1) in its open tool call `tc`.
fn tokened_ws_gateway(origin: SocketAddr) -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{upstream}resolve = {{ \"{WS_HOST}\" = \"127.0.0.1\" }}\n\
         [[identity_providers]]\nname = \"p\"\nkind = \"static\"\ntoken = {{ env = \"WS_TEST_TOKEN\" }}\n\
         [[credential_rules]]\nhosts = [\"{WS_HOST}\"]\nports = [{port}]\naudience = \"ws\"\nprovider = \"p\"\n\
         [[agents]]\nid = \"auto\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.1\"]\n",
        upstream = loopback_upstream(Some(&origin_ca().cert_path())),
        port = origin.port(),
    );
    let gw = Gateway::start_with_env(&config, &[RUN_MODES], "", &[("WS_TEST_TOKEN", WS_TOKEN)]);
    let opened = gw.admin_call("POST", "/v1/agents/auto/tool-calls", Some(r#"{"id":"tc"}"#));
    assert_eq!(opened.status, 201);
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_opened_with_a_tool_calls_token_ends_with_the_tool_call() {
    let (gw, authority, tls, _origin) = tokened_ws_tunnel(TlsWsOrigin::Echo).await;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{authority}/chat"), tls)
        .await
        .expect("handshake");
    echo(&mut ws, 2).await;
    let closed = tokio::task::block_in_place(|| {
        gw.admin_call("DELETE", "/v1/agents/auto/tool-calls/tc", None)
    });
    assert_eq!(closed.status, 204);
    // Within the gateway's one-second check, the connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(Message::Text(_) | Message::Binary(_))) = ws.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the upgraded connection outlived its tool call"
    );
}
