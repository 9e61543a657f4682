"""Full-ranking evaluation: Recall@K and NDCG@K over the whole catalogue, warm and cold-start."""
