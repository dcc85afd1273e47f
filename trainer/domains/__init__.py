"""What each domain's learner needs: data, network, export, metrics."""
