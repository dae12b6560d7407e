"""Serving over a cluster: the app's models on Ray Serve replicas, the page and APIs on an ingress.

The only package that imports ray. ``remote`` holds the manager-like proxy the ingress's Service uses
(so tasks/ and web/ never learn that the models live elsewhere); ``ray_serve`` holds the deployments,
the application builder and ``python -m blip_app serve-ray``.
"""
