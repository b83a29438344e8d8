"""What the platform tells Prometheus and Grafana: the PromQL of every figure (`promql`), built once and
used by the rollout gates' SLO queries, the chart's alert rules (`alerts`) and its dashboard (`dashboard`)."""
