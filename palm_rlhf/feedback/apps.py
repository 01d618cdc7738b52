from django.apps import AppConfig


class FeedbackConfig(AppConfig):
    name = "palm_rlhf.feedback"
    label = "feedback"
    verbose_name = "Human feedback"
