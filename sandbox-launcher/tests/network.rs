//! The sandbox network for real: namespaces, the veth pair and the nftables rules made by the
//! launcher, probed from inside the sandbox's namespace. Needs root, iproute2 and nftables;
//! skips with the reason otherwise (CI has them). Only addresses on the devices this test
//! creates are ever contacted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tollgate_launcher::network::{in_namespace, SandboxNetwork, HOST_ADDRESS};

fn missing_prerequisite() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Some("network namespaces need root".into());
    }
    for (program, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if Command::new(program).arg("--version").output().is_err() {
            return Some(format!(
                "{program} is missing (apt-get install -y {package})"
            ));
        }
    }
    None
}

/// Tries a TCP connection (from the current namespace) and reads the greeting.
fn greeting(addr: SocketAddr) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// Serves one greeting per connection on `listener`, forever (the thread ends with the test).
fn greet(listener: TcpListener, text: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(text.as_bytes());
        }
    });
}

#[test]
fn the_sandbox_reaches_the_gateway_port_and_nothing_else_and_destroy_leaves_nothing() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return;
    }
    let agent = format!("nt{}", std::process::id());
    let net = SandboxNetwork::new(&agent, 3128).expect("network plan");
    let _ = net.destroy();
    net.create().expect("create the sandbox network");
    let gateway_side = net.gateway_namespace_path();
    let sandbox_side = Path::new("/run/netns").join(net.sandbox_namespace());

    // Stand-ins for the gateway on its side: the agent's port, and another port.
    let (allowed, other) = in_namespace(&gateway_side, || {
        let allowed = TcpListener::bind((HOST_ADDRESS, 3128)).expect("bind 3128");
        let other = TcpListener::bind((HOST_ADDRESS, 9999)).expect("bind 9999");
        Ok((allowed, other))
    })
    .expect("the gateway's side");
    greet(allowed, "gateway");
    greet(other, "other");

    let gateway = SocketAddr::from((HOST_ADDRESS, 3128));
    let elsewhere = SocketAddr::from((HOST_ADDRESS, 9999));
    let (to_gateway, to_other, ipv6) = in_namespace(&sandbox_side, move || {
        Ok((
            greeting(gateway),
            greeting(elsewhere),
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6"),
        ))
    })
    .expect("the sandbox's side");
    assert_eq!(
        to_gateway.expect("the gateway port is reachable"),
        "gateway"
    );
    let refused = to_other.expect_err("another port on the gateway's side must be refused");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert_eq!(
        ipv6.expect("sysctl").trim(),
        "1",
        "IPv6 is off in the sandbox"
    );

    net.destroy().expect("destroy");
    assert!(!net.exists(), "both namespaces are gone");
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&agent));
    // Destroying again is not an error.
    net.destroy().expect("destroy twice");
}
