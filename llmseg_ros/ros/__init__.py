"""ROS-free logic beneath the ROS 2 node.

Everything here works on message *fields*, so the same code serves rclpy messages on a
robot and the ``rosbags`` message classes in tests and in bag replay. Nothing in this
package imports ROS; :mod:`llmseg_ros.node` is the only rclpy code and only converts.

Modules: ``images`` (Image ↔ numpy), ``depth`` (masked depth, point clouds), ``frames``
(frames and the frame buffer), ``features`` (per-frame feature cache), ``precompute``
(background per-frame work), ``handler`` (service requests), ``outputs`` (topic payloads),
``messages`` (message construction for any implementation), ``params`` (parameters ↔
config), ``schedule`` (which instruction applies to which frame of a replayed bag).
"""
