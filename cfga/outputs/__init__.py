"""What a person reads: metrics records, paper tables, plots."""
