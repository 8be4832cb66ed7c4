"""Routes: /hello, and /items/<int:item_id> through a nested include() (its route label joins both)."""

from django.urls import include, path

from project import views

items = [path("<int:item_id>", views.read_item)]

urlpatterns = [
    path("hello", views.hello),
    path("items/", include(items)),
]
