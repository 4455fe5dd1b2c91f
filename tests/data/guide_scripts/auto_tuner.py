# auto_tuner.py
import requests
import time
import numpy as np
import os

HEADERS = {"X-Inferos-Token": os.environ.get("INFEROS_AGENT_TOKEN", "")}

class InferOSAutoTuner:
    def __init__(self, agent_url=os.environ.get("INFEROS_AGENT_URL", "http://127.0.0.1:7031")):
        self.agent_url = agent_url
        self.performance_history = []
    
    def get_metrics(self):  # not defined in the guide
        return requests.get(self.agent_url + "/v1/metrics", headers=HEADERS).json()

    def apply_policy(self, policy):  # not defined in the guide
        r = requests.post(self.agent_url + "/v1/policy", json=policy, headers=HEADERS)
        print(r.status_code, r.json())

    def tune_for_workload(self, target_tps=None, target_quality=None):
        """ワークロードに基づく自動チューニング"""
        current_metrics = self.get_metrics()
        
        if target_tps and current_metrics['tps'] < target_tps:
            # スループット向上のための調整
            self.adjust_for_throughput()
        
        if target_quality and current_metrics['quality']['delta_ppl_est'] > target_quality:
            # 品質向上のための調整
            self.adjust_for_quality()
    
    def adjust_for_throughput(self):
        """スループット向上調整"""
        policy = {
            "kv": {"recent_window": 32, "level_thresholds": {"L1_int8": 0.6, "L2_int4": 0.4, "L3_evict": 0.2}},
            "scheduler": {"mode": "hybrid"}
        }
        self.apply_policy(policy)
    
    def adjust_for_quality(self):
        """品質向上調整"""
        policy = {
            "kv": {"recent_window": 128, "level_thresholds": {"L1_int8": 0.8, "L2_int4": 0.6, "L3_evict": 0.4}},
            "scheduler": {"mode": "hybrid"}
        }
        self.apply_policy(policy)

# 使用例
tuner = InferOSAutoTuner()
tuner.tune_for_workload(target_tps=30.0, target_quality=0.3)
