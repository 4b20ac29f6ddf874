//! A wazuh-proxy inside another program: agents on one address, balanced over two managers,
//! drained on Ctrl-C.
//!
//! Run: `cargo run -p wazuh-proxy-core --example embed -- [LISTEN] [MANAGER] [MANAGER]`
//! (defaults `127.0.0.1:1514 127.0.0.1:11514 127.0.0.1:21514`).

use std::net::SocketAddr;

use wazuh_proxy_core::proxy::{ListenerConfig, Proxy, ProxyConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut addr = |default: &str| -> Result<SocketAddr, std::net::AddrParseError> {
        args.next().as_deref().unwrap_or(default).parse()
    };
    let listen = addr("127.0.0.1:1514")?;
    let managers = [addr("127.0.0.1:11514")?, addr("127.0.0.1:21514")?];

    let agents = ListenerConfig::agent("agents", listen, &managers);
    let mut proxy = Proxy::start(ProxyConfig::new(vec![agents])).await?;
    println!("listening on {listen}, balancing over {managers:?}; Ctrl-C drains");

    tokio::signal::ctrl_c().await?;
    proxy.drain().await;
    println!("drained");
    Ok(())
}
