"""The default image of every component (images/base); pipelines override it per task with their
`base_image` parameter."""

BASE_IMAGE = "cafe-base:latest"
