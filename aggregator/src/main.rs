fn main() -> anyhow::Result<()> {
    anyhow::bail!("the aggregator is not implemented yet")
}
