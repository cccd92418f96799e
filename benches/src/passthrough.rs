//! The benchmark's baseline proxy: a bare pingora forward proxy for plain HTTP — no identity,
//! no policy, no credentials, no telemetry, no audit — so that the comparison shows what the
//! framework itself costs and what Tollgate adds on top.
//!
//! It forwards each absolute-form request (`GET http://host:port/path`) to `host:port` (names
//! mapped with `--resolve NAME=IP`, nothing is looked up), rewritten to origin form, over
//! pingora's pooled upstream connections. It runs a pingora `Server` with one worker thread
//! per CPU, like the gateway's default, and prints `ready <address>` once it listens.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use clap::Parser;
use pingora::http::RequestHeader;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::{Error, ErrorType};

/// A bare pingora forward proxy for plain HTTP.
#[derive(Parser)]
struct Args {
    /// The address to listen on (port 0 is not supported by pingora: pick a free one).
    #[arg(long)]
    listen: SocketAddr,
    /// Fixed addresses for host names, `NAME=IP` (repeatable).
    #[arg(long = "resolve")]
    resolve: Vec<String>,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

struct PassThrough {
    resolve: HashMap<String, IpAddr>,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        // pingora keeps an absolute-form target as sent in raw_path(); `uri` has its path.
        let uri: http::Uri = String::from_utf8_lossy(session.req_header().raw_path())
            .parse()
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad request target"))?;
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(80);
        let ip = match self.resolve.get(host) {
            Some(ip) => *ip,
            None => host
                .parse()
                .map_err(|_| Error::explain(ErrorType::ConnectNoRoute, "unknown host"))?,
        };
        Ok(Box::new(HttpPeer::new(
            SocketAddr::new(ip, port),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        // Origins get origin form (`uri` is already just the path).
        let origin_form = upstream_request.uri.clone();
        upstream_request.set_uri(origin_form);
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut resolve = HashMap::new();
    for pair in &args.resolve {
        let (name, ip) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--resolve {pair}: expected NAME=IP"))?;
        resolve.insert(name.to_string(), ip.parse()?);
    }
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let conf = ServerConf {
        threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, PassThrough { resolve });
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    println!("ready {}", args.listen);
    server.run_forever()
}
