//! Runs the testkit's mock OpenAI upstream on a fixed address, for load
//! benchmarks that compare calling it directly with calling it through Backstop.
//!
//! Usage: bench-mock [ADDR]   (default 127.0.0.1:18081)

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into())
        .parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mock = backstop_testkit::MockUpstream::bind(addr).await?;
        println!("mock upstream on {}", mock.url());
        std::future::pending::<()>().await;
        Ok(())
    })
}
