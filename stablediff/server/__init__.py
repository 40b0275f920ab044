"""`stablediff serve`: a native job API and AUTOMATIC1111's API over one persistent queue."""
